"""A committed checkpoint as a model of the LM Evaluation Harness (`lm-eval`, the optional extra
`hyrun[eval]`), scored on tasks given as local files: a task YAML whose `dataset_kwargs.data_files`
name JSONL files beside it (`examples/eval/`). Nothing is fetched from a hub. The evaluation beside
training runs the job's `data.validation.lm_eval_tasks` on every checkpoint it scores."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.model import LM

from hyrun.runtime.model.transformer import MoETransformer


class HyrunLM(LM):
    """Scores text with one whole `MoETransformer` on this process's CPU, through the job's tokenizer."""

    def __init__(self, model: MoETransformer, tokenizer, eos_id: int, max_gen_tokens: int = 32) -> None:
        super().__init__()
        self.model, self.tokenizer, self.eos_id = model.eval(), tokenizer, eos_id
        self.max_length = model.config.max_seq_len
        self.max_gen_tokens = max_gen_tokens

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    @torch.no_grad()
    def _continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context), and whether greedy decoding would produce it; the context is
        cut from the left to fit the model (an empty one starts from EOS, as documents do)."""
        tokens = ([self.eos_id] + context + continuation)[-(self.max_length + 1):]
        logits = self.model(torch.tensor([tokens[:-1]])).logits[0, -len(continuation):].float()
        logprobs = F.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation)
        return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._continuation_logprob(self._encode(context), self._encode(continuation))
                for context, continuation in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each string's whole log-likelihood, in windows of the model's length (each token scored once)."""
        out = []
        for (text,) in (r.args for r in requests):
            tokens, total = self._encode(text), 0.0
            for start in range(0, len(tokens), self.max_length):
                window = tokens[start:start + self.max_length]
                total += self._continuation_logprob(tokens[max(0, start - self.max_length):start], window)[0]
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy decoding until a stop string, EOS or `max_gen_toks` (default max_gen_tokens)."""
        out = []
        for context, options in (r.args for r in requests):
            until = list(options.get("until", []))
            tokens = [self.eos_id] + self._encode(context)
            generated: list[int] = []
            for _ in range(int(options.get("max_gen_toks", self.max_gen_tokens))):
                logits = self.model(torch.tensor([(tokens + generated)[-self.max_length:]])).logits[0, -1]
                token = int(logits.argmax())
                if token == self.eos_id:
                    break
                generated.append(token)
                if any(stop in self.tokenizer.decode(generated) for stop in until):
                    break
            text = self.tokenizer.decode(generated)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def local_task(path: Path) -> dict:
    """A task YAML as lm-eval's config dict, its data files made absolute (relative to the YAML)."""
    config = yaml.safe_load(Path(path).read_text())
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: str((Path(path).parent / f).resolve()) for split, f in files.items()}
    return config


def run_tasks(model: MoETransformer, corpus: Path, task_files: list[Path], limit: int | None = None) -> dict[str, dict[str, float]]:
    """task -> metric -> value for `model` on the local task files, with the corpus's tokenizer."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from tokenizers import Tokenizer

    from hyrun.runtime.data.manifest import read_manifest

    manifest = read_manifest(corpus)
    lm = HyrunLM(model, Tokenizer.from_file(str(corpus / "tokenizer.json")), manifest.tokenizer.eos_id)
    results = simple_evaluate(model=lm, tasks=[local_task(f) for f in task_files], limit=limit,
                              bootstrap_iters=0, log_samples=False)["results"]
    return {task: {metric.split(",")[0]: float(value) for metric, value in scores.items()
                   if isinstance(value, (int, float)) and not metric.split(",")[0].endswith("_stderr")}
            for task, scores in results.items()}
