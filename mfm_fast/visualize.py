"""``python -m mfm_fast.visualize``: pictures of the corruption and of a pre-trained model's reconstructions (the code: mfm_fast/train/visualize.py)."""

if __name__ == "__main__":
    from .train import run_command

    run_command("visualize")
