"""lora-tune: a YAML recipe in, a LoRA fine-tuned, evaluated and verified merged model out."""

__version__ = "0.1.0"
