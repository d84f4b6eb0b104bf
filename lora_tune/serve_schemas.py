"""What clients of `lora-tune serve` send, and what an adapter's folder must declare.

The request bodies of OpenAI's API (the fields lora-tune acts on) and of vLLM's adapter routes,
and `AdapterConfig`, the adapter_config.json fields serving computes with. Plain pydantic models:
this module imports nothing else of lora-tune.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# --- requests, as the OpenAI API defines them (the fields lora-tune acts on) -----------------


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1


class CompletionRequest(Sampling):
    prompt: str | list[str]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart]

    def plain(self) -> dict:
        """{role, content} with the content as one string, as chat templates expect."""
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        return {"role": self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str


class UnloadAdapter(BaseModel):
    lora_name: str


class AdapterConfig(BaseModel):
    """The adapter_config.json fields that serving and PEFT compute with, strictly typed: PEFT
    itself meets a wrong type only deep inside building the layers. Other fields pass through."""

    model_config = ConfigDict(extra="allow", strict=True)
    peft_type: str
    base_model_name_or_path: str | None = None
    r: int = Field(8, ge=1)
    lora_alpha: float = 8
    target_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
