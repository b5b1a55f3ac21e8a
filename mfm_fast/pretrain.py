"""``python -m mfm_fast.pretrain``: MFM / FOLK pre-training of a timm backbone (the code: mfm_fast/train/pretrain.py)."""

if __name__ == "__main__":
    from .train import run_command

    run_command("pretrain")
