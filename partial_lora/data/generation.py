"""`generation`: prompt -> response fine-tuning data (instructions, summaries...) for causal LMs.

Each row becomes the multiple-choice row format with a single choice, the response:
`prompt` = the prompt column, `choices` = [response], `label` = 0. Everything downstream is
shared with the commonsense tasks: training minimises the LM loss on the response tokens only
(`data.collate.ChoiceCollate`), and evaluation scores the response's log-likelihood.
There is no accuracy: the task's metric is `log_likelihood` (the mean over examples of the
response's log-likelihood, per token with `task.scoring=mean`), and the allocation reads the
few-shot loss (`adapter.allocation.metric=loss`), [ours].
"""

from __future__ import annotations

import datasets

from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.commonsense import FEATURES
from partial_lora.data.source import load_source
from partial_lora.data.split import task_data
from partial_lora.errors import PlrError


def load_generation(spec: TaskSpec) -> TaskData:
    """Load prompt/response rows (`task.text_column`, `task.response_column`) as one-choice rows.

    Rows with an empty or missing response are dropped: there is nothing to learn from them.

    Raises:
        PlrError: no `task.response_column`, a column the data lacks, or no usable row.
    """
    prompt, response = spec.text_column, spec.response_column
    if not response:
        raise PlrError("task.response_column is not set; name the column holding the text the model should "
                       "produce (e.g. task.response_column=response)")
    out = {}
    for split, ds in load_source(spec).items():
        for column, key in ((prompt, "task.text_column"), (response, "task.response_column")):
            if column not in ds.column_names:
                raise PlrError(f"{key}='{column}' is not a column of the dataset (split '{split}', columns: "
                               f"{', '.join(ds.column_names)}); set {key}=<one of those>")
        ds = ds.filter(lambda rs: [bool(r and str(r).strip()) for r in rs], input_columns=response, batched=True)
        ds = ds.map(lambda b: {"prompt": [str(p or "") for p in b[prompt]], "choices": [[str(r)] for r in b[response]],
                               "label": [0] * len(b[response])},
                    batched=True, remove_columns=ds.column_names, features=FEATURES,
                    desc=f"formatting {spec.name}/{split}")
        out[split] = ds
    if not any(len(ds) for ds in out.values()):
        raise PlrError(f"task.path='{spec.path}' has no row with a non-empty {response}; point task.path at "
                       "prompt/response data")
    return task_data(spec, "choice", datasets.DatasetDict(out), ["response"])
