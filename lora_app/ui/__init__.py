"""The Gradio app: one module per step (model, adapter, data, train, test, save, runs/compare) plus
engine-free logic (timeline, runlist, settings, estimates). The only package that imports gradio."""
