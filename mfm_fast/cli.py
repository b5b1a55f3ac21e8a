"""Command-line plumbing shared by the package's CLIs and the bench scripts."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line "prog: error: --flag: what is wrong" (exit status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
