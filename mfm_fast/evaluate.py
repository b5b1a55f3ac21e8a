"""``python -m mfm_fast.evaluate``: a classifier on an ImageFolder, ImageNet-R / -A or -C (mfm_fast/train/evaluate.py)."""

if __name__ == "__main__":
    from .train import run_command

    run_command("evaluate")
