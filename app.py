"""The LoRA studio: `python app.py [--host 127.0.0.1] [--port N] [--auth user:password] [--share]
[--runs-dir runs] [--models-dir DIR] [--no-browser]`. The page lives in lora_app/ui/."""

from lora_app.ui.cli import main

if __name__ == "__main__":
    main()
