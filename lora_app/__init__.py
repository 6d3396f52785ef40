"""A local LoRA fine-tuning studio: an MLX LoRA engine, its CLI (`python -m lora_app`) and a Gradio app."""

__version__ = "0.1.0"
