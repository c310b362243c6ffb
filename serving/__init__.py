"""Serving side: archive configs -> .mar archives, a real TorchServe, and the version management CLI.

`python -m serving --help` lists the commands; docs/serving.md describes archives, configuration and the CLI.
"""
