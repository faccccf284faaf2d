"""xclip: evaluate, explain and fine-tune CLIP-family vision-language models."""

__version__ = "0.1.0"
