"""Causal-LM scoring: a decoder LM behind the classifier's call convention (`CausalLM`).

Multiple-choice tasks are answered by the log-likelihood of each choice (summed or per token,
`SCORING`), and trained with the LM loss on the answer tokens only. `backbones.build_hf_causal`
builds it (family `hf-causal`); `data.collate.ChoiceCollate` builds its batches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from partial_lora.errors import PlrError
from partial_lora.models.classifier import Classifier

SCORING = ("sum", "mean")


class CausalLM(Classifier):
    """A decoder LM behind the classifier's call convention, for multiple-choice tasks.

    - A training batch (`input_ids`, `attention_mask`, `labels` with -100 outside the answer;
      `data.collate.ChoiceCollate(train=True)`) gives the LM loss on the answer tokens.
    - An evaluation batch (every choice as a row, `target_mask` on its answer tokens,
      `choice_mask`, `choice_tokens`, `labels` = gold index) gives one score per choice, (B, C)
      padded to `num_choices` with -inf: the log-likelihood of the choice's answer tokens, summed
      (`scoring=sum`, lm-evaluation-harness's `acc`) or per token (`mean`). Accuracy is then the
      argmax, as for a classifier's logits.

    The vocabulary projection runs only at the answer positions (the LM's hidden states are
    taken from its base model): with a 128k vocabulary, the full logits of a batch would take
    gigabytes. Models whose logits are more than `lm_head(h)` (soft-capping, a logit scale) take
    the full path, and so does a model sharded with FSDP (`trainer.strategy=fsdp`), whose root
    gathers the embeddings and the LM head only in its own forward: there the full logits cost
    B × T × V per batch.
    """

    def __init__(self, net: nn.Module, num_choices: int, scoring: str = "sum") -> None:
        super().__init__(net, "hf-causal", [])
        if scoring not in SCORING:
            raise PlrError(f"task.scoring must be one of {', '.join(SCORING)}, got '{scoring}'")
        self.num_choices, self.scoring = num_choices, scoring
        config = getattr(net, "config", None)
        self.full_logits = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale"))

    def _answer_logits(self, batch: Mapping[str, Tensor], where: Tensor) -> Tensor:
        """Logits predicting the tokens at `where` (B, T) (each from the position before), (N, V)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.full_logits:
            return self.net(**inputs).logits[:, :-1][where[:, 1:]]
        hidden = self.net.base_model(**inputs).last_hidden_state
        return self.net.get_output_embeddings()(hidden[:, :-1][where[:, 1:]])

    def _next_token_scores(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Every choice's log-probability as the token after the prompt (one-token answers), (B, C)."""
        where = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        where[torch.arange(where.shape[0], device=where.device), batch["last"]] = True
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.full_logits:
            logits = self.net(**inputs).logits[where]
        else:
            logits = self.net.get_output_embeddings()(self.net.base_model(**inputs).last_hidden_state[where])
        return logits.float().log_softmax(-1).gather(-1, batch["choice_ids"])

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "choice_ids" in batch:
            scores = self._next_token_scores(batch).masked_fill(~batch["choice_mask"].bool(), float("-inf"))
            pad = self.num_choices - scores.shape[1]
            return nn.functional.pad(scores, (0, pad), value=float("-inf")) if pad > 0 else scores
        if "choice_mask" not in batch:
            labels = batch["labels"]
            logits = self._answer_logits(batch, labels != -100)
            return nn.functional.cross_entropy(logits.float(), labels[:, 1:][labels[:, 1:] != -100])
        target = batch["target_mask"].bool()
        logp = self._answer_logits(batch, target).float().log_softmax(-1)
        tokens = batch["input_ids"][:, 1:][target[:, 1:]]
        token_lp = logp.gather(-1, tokens[:, None]).squeeze(-1)
        rows = torch.arange(target.shape[0], device=target.device)[:, None].expand(-1, target.shape[1] - 1)
        sums = torch.zeros(target.shape[0], device=token_lp.device).index_add_(0, rows[target[:, 1:]], token_lp)
        choice_mask = batch["choice_mask"].bool()
        scores = sums.view(choice_mask.shape)
        if self.scoring == "mean":
            scores = scores / batch["choice_tokens"].clamp(min=1)
        scores = scores.masked_fill(~choice_mask, float("-inf"))
        pad = self.num_choices - scores.shape[1]
        return nn.functional.pad(scores, (0, pad), value=float("-inf")) if pad > 0 else scores

    def loss_units(self, batch: Mapping[str, Tensor]) -> int | None:
        """The answer tokens `loss` averages over: the LM loss's labelled tokens, or the gold
        choices' tokens (a per-token mean, not a per-row one)."""
        if "choice_mask" not in batch and "choice_ids" not in batch:
            return int((batch["labels"][:, 1:] != -100).sum())
        return int(batch["choice_tokens"].gather(1, batch["labels"][:, None]).sum())

    def loss(self, out: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """The training loss as it is, or, for choice scores, the gold answers' NLL per token."""
        if out.dim() == 0:
            return out
        labels = batch["labels"]
        gold = out.gather(1, labels[:, None]).squeeze(1)
        n = batch["choice_tokens"].gather(1, labels[:, None]).squeeze(1).float()
        total = gold * n if self.scoring == "mean" else gold
        return -total.sum() / n.sum().clamp(min=1)
