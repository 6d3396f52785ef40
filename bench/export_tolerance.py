"""How far a correct fuse moves the logits, per kind of written weights: what check.py's TOLERANCE is set from.

    .venv/bin/python bench/export_tolerance.py              # tiny llama (float32, float16, bfloat16 bases) + demo
    .venv/bin/python bench/export_tolerance.py --no-demo    # the tiny models only (seconds)

For each base model and seed a random adapter (rank 8, q/v/down of every block unless the row says otherwise,
B ~ N(0, sigma): a zero B would show nothing) is exported by `export_adapter` exactly as the CLI does it, and its
check (lora_app/adapters/check.py: the written folder through mlx_lm.load against base + adapter, three prompts)
is read back from check.json. A correct fuse differs only by rounding: the float dtype's, or the
re-quantization's. The table gives, per base and written kind, the largest relative difference seen (largest
|fused - reference| / largest |reference logit|), the adapter's own effect (base with and without it) and the
largest ratio of the two, the lowest greedy agreement, check.py's tolerance for that kind, and how many of the
seeds' exports the check passed (quantized exports must also stay under half the adapter's effect and keep
95% of the greedy tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# base -> [(export settings, label)]: what each kind of base can be written as
CASES = {
    "tiny float32": [({}, "float32"), ({"quantize": 8}, "8-bit from float"), ({"quantize": 4}, "4-bit from float")],
    "tiny float16": [({}, "float16")],
    "tiny bfloat16": [({}, "bfloat16")],
    "demo (4-bit base)": [({"dequantize": True}, "float16 (de-quantized)"), ({}, "4-bit (base's own)"),
                          ({"quantize": 8}, "8-bit from 4-bit")],
    "demo, q/v of 4 blocks": [({}, "4-bit (base's own)")],
}
SIGMA = {"tiny": 0.2, "demo": 0.02}
# the adapter: (modules, layers); by default q/v/down of every block
ADAPTER = {"demo, q/v of 4 blocks": (["q_proj", "v_proj"], "last:4")}


def cast_copy(model_dir: Path, out: Path, dtype: str) -> Path:
    """The tiny model with its weights in another float dtype (the fused model keeps the base's dtype)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(model_dir))
    model.set_dtype(getattr(mx, dtype))
    out.mkdir(parents=True)
    for p in model_dir.iterdir():
        if p.name != "model.safetensors":
            (out / p.name).write_bytes(p.read_bytes())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


def random_adapter(base: Path, out: Path, seed: int, sigma: float, modules: list[str], layers: str) -> Path:
    import mlx.core as mx

    from lora_app.adapters import adapter_config, save_adapter
    from lora_app.config import LoraConfig
    from lora_app.lora import adapter_tensors, apply_lora
    from lora_app.models import load_model

    model, _ = load_model(str(base), dequantize=False)
    lora = LoraConfig(rank=8, alpha=16.0, modules=modules, layers=layers)
    targets = apply_lora(model, lora, seed=seed)
    mx.random.seed(seed)
    weights = {n: mx.random.normal(v.shape) * sigma if n.endswith("lora_b") else v
               for n, v in adapter_tensors(model).items()}
    return save_adapter(model, out, adapter_config(lora, targets, len(model.layers), str(base)), weights)


def bases(tmp: Path, demo: bool) -> dict[str, Path]:
    import tiny

    float32 = tiny.build_tiny_model(tmp / "tiny-float32")
    out = {"tiny float32": float32, "tiny float16": cast_copy(float32, tmp / "tiny-float16", "float16"),
           "tiny bfloat16": cast_copy(float32, tmp / "tiny-bfloat16", "bfloat16")}
    if demo:
        from lora_app.demo import demo_model_dir

        out["demo (4-bit base)"] = out["demo, q/v of 4 blocks"] = demo_model_dir()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-demo", action="store_true", help="Only the tiny models.")
    args = parser.parse_args()
    from lora_app.adapters import export_adapter
    from lora_app.adapters.check import TOLERANCE, read_check

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, base in bases(Path(tmp), not args.no_demo).items():
            for settings, label in CASES[name]:
                results = []
                for seed in range(args.seeds):
                    where = Path(tmp) / f"{name}-{label}-{seed}".replace(" ", "_")
                    modules, layers = ADAPTER.get(name, (["q_proj", "v_proj", "down_proj"], "all"))
                    adapter = random_adapter(base, where / "adapter", seed, SIGMA[name.split()[0].strip(",")],
                                             modules, layers)
                    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm's quantize prints a line
                        out = export_adapter(adapter, "mlx", where / "out", **settings)
                    results.append(read_check(out)["fuse"])
                kind = results[0]["weights"]
                row = {"base": name, "written": label, "kind": kind, "seeds": len(results),
                       "max_rel_diff": max(r["max_rel_diff"] for r in results),
                       "adapter_effect": min(r["adapter_effect_rel"] for r in results),
                       "diff_vs_effect": max(r["max_rel_diff"] / r["adapter_effect_rel"] for r in results),
                       "argmax_agreement": min(r["argmax_agreement"] for r in results), "tolerance": TOLERANCE[kind],
                       "passed": sum(r["ok"] for r in results)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| base | written as | check's kind | largest relative difference | adapter's own effect (smallest) "
          "| difference / effect (largest) | greedy agreement (lowest) | tolerance (check.py) | check passed |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['base']} | {r['written']} | {r['kind']} | {r['max_rel_diff']:.2g} | {r['adapter_effect']:.2g} "
              f"| {r['diff_vs_effect']:.2g} | {r['argmax_agreement']:.0%} | {r['tolerance']:.2g} "
              f"| {r['passed']}/{r['seeds']} |")


if __name__ == "__main__":
    main()
