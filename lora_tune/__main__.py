"""`python -m lora_tune ...` (and `accelerate launch -m lora_tune train RECIPE`) runs the CLI."""

from .cli import main

main()
