"""``python -m mfm_fast.linprobe``: the linear probe of a pre-trained encoder (the code: mfm_fast/train/linprobe.py)."""

if __name__ == "__main__":
    from .train import run_command

    run_command("linprobe")
