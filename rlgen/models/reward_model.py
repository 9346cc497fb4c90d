"""Scalar reward models on Hugging Face backbones.

Two heads, one interface (`reward_scores`):
- `sequence-classification`: AutoModelForSequenceClassification with one label (a Llama/GPT-2/...
  checkpoint gets a fresh `score` head); saved and loaded back by plain transformers.
- `value-head`: for causal LMs whose architecture has no sequence-classification class, the causal LM
  plus a linear head on the last token's hidden state, saved as the LM's HF directory plus
  `value_head.safetensors` and `rlgen_reward_model.json`.
The reward of (prompt, completion) is the head's output at the last token of prompt + completion.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rlgen.data.chat import message_text
from rlgen.devices import module_device
from rlgen.errors import RlgenError
from rlgen.models.causal_lm import DTYPES, load_tokenizer, quiet_transformers, resolve_model_path
from rlgen.models.safe_load import NO_CODE, check_model_dir, load_errors, weights_kwargs
from rlgen.models.sequences import pad_tokens

HEADS = ("auto", "sequence-classification", "value-head")
VALUE_HEAD_FILE = "value_head.safetensors"
MARKER = "rlgen_reward_model.json"


class ValueHeadModel(torch.nn.Module):
    """A causal LM's decoder with a scalar head on the last attended position."""

    def __init__(self, lm, head: torch.nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        hidden = lm.get_input_embeddings().weight.shape[1]
        self.value_head = head if head is not None else torch.nn.Linear(hidden, 1)
        if head is None:
            torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        last = attention_mask.sum(1) - 1  # right padding: the last real token
        hidden = out.hidden_states[-1][torch.arange(input_ids.shape[0]), last]
        return self.value_head(hidden.to(self.value_head.weight.dtype))

    def save_pretrained(self, directory: str, safe_serialization: bool = True, state_dict: dict | None = None) -> None:
        """The LM as an HF directory plus the head's file; `state_dict` (this module's keys, e.g. the full
        state FSDP gathered) replaces the live weights."""
        from safetensors.torch import save_file

        if state_dict is None:
            self.lm.save_pretrained(directory, safe_serialization=True)
            head = self.value_head.state_dict()
        else:
            lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
            self.lm.save_pretrained(directory, safe_serialization=True, state_dict=lm_state)
            head = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
        state = {k: v.detach().contiguous() for k, v in head.items()}
        save_file(state, str(Path(directory) / VALUE_HEAD_FILE))
        (Path(directory) / MARKER).write_text(json.dumps({"head": "value-head"}) + "\n")


def load_reward_model(path: Path, dtype: str = "float32", head: str = "auto"):
    """(model, tokenizer) for training or scoring. A plain causal-LM checkpoint gets a new head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    path = Path(path)
    tokenizer = load_tokenizer(path)
    marker = path / MARKER
    saved_head = json.loads(marker.read_text()).get("head") if marker.is_file() else None
    if head not in HEADS:
        raise RlgenError(f"reward head must be one of {', '.join(HEADS)}, got {head!r}")
    if saved_head == "value-head" or head == "value-head":
        model = ValueHeadModel(_load(AutoModelForCausalLM, path, dtype))
        head_file = path / VALUE_HEAD_FILE
        if head_file.is_file():
            from safetensors.torch import load_file

            model.value_head.load_state_dict(load_file(str(head_file)))
        return model, tokenizer
    check_model_dir(path, "transformers.AutoModelForSequenceClassification")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=DTYPES[dtype],
                                                                   **weights_kwargs())
    except ValueError as exc:  # no sequence-classification class for this architecture (or custom code)
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise RlgenError(f"cannot load a reward model from {path}: the directory asks for its own Python code; "
                             f"{NO_CODE}") from None
        if head == "sequence-classification":
            raise RlgenError(f"cannot load {path} as a sequence classifier: {str(exc).splitlines()[0]}") from None
        return ValueHeadModel(_load(AutoModelForCausalLM, path, dtype)), tokenizer
    except Exception as exc:
        raise RlgenError(f"cannot load a reward model from {path}: {str(exc).splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise RlgenError(f"{path} is a classifier with {model.config.num_labels} labels; a reward model has 1")
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers pool at the last non-pad token
    return model, tokenizer


def _load(cls, path: Path, dtype: str):
    check_model_dir(path, f"transformers.{cls.__name__}")
    with load_errors(f"cannot load a reward-model backbone from {path}"):
        return cls.from_pretrained(str(path), dtype=DTYPES[dtype], **weights_kwargs())


def encode_texts(tokenizer, prompts: list[str], completions: list[str],
                 add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of prompt + completion (one text, tokenised together; text rendered by a chat
    template holds its special tokens already: `add_special_tokens=False`)."""
    ids = tokenizer([p + c for p, c in zip(prompts, completions)], add_special_tokens=add_special_tokens).input_ids
    return pad_tokens(ids, tokenizer.pad_token_id, left=False)


def reward_scores(model, tokenizer, prompts: list[str], completions: list[str], add_special_tokens: bool = True) -> torch.Tensor:
    """[B] scalar rewards (with gradient when the caller is training). Identical (prompt, completion)
    rows are scored once, so they get identical rewards (a tie is a tie) and duplicates cost nothing."""
    unique: dict[tuple[str, str], int] = {}
    rows = [unique.setdefault((p, c), len(unique)) for p, c in zip(prompts, completions)]
    ids, mask = encode_texts(tokenizer, [p for p, _ in unique], [c for _, c in unique], add_special_tokens)
    device = module_device(model)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    logits = (out if isinstance(out, torch.Tensor) else out.logits).reshape(-1).float()
    return logits if len(unique) == len(rows) else logits.index_select(0, torch.tensor(rows, device=device))


class RewardModelReward:
    """`--reward rm:PATH`: a trained reward model as a batched reward function (no gradient)."""

    is_correctness = False

    def __init__(self, path: str, batch_size: int = 64):
        self.path = resolve_model_path(path)
        self.batch_size = batch_size
        self.model, self.tokenizer = load_reward_model(self.path)
        self.model.eval()
        self.description = f"reward model {self.path}"

    @torch.no_grad()
    def __call__(self, samples: list[dict], **_) -> list[float]:
        out: list[float] = []
        for start in range(0, len(samples), self.batch_size):
            part = samples[start : start + self.batch_size]
            scores = reward_scores(self.model, self.tokenizer, [message_text(s["prompt"]) for s in part],
                                   [message_text(s["completion"]) for s in part])
            out.extend(scores.tolist())
        return out


_LOADED: dict[str, RewardModelReward] = {}


def reward_model_reward(path: str) -> RewardModelReward:
    """One loaded copy per path and process (a guide, a score and a train may name the same RM)."""
    key = str(Path(path).resolve()) if Path(path).exists() else path
    if key not in _LOADED:
        _LOADED[key] = RewardModelReward(path)
    return _LOADED[key]
