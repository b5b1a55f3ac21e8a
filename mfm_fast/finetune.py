"""``python -m mfm_fast.finetune``: fine-tune a timm classifier from an MFM / FOLK encoder (mfm_fast/train/finetune.py)."""

if __name__ == "__main__":
    from .train import run_command

    run_command("finetune")
