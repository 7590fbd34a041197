"""RPT next-token-reasoning tasks: entropy-filtered corpus positions, their files, and the reader.

A task is a corpus position t of a document tokenized by the POLICY's tokenizer: the context is
the text of tokens[:t], the target the next `--target-tokens` tokens (their exact bytes, for the
prefix-match reward of `rpt.reward`). Positions are kept where a small PROXY model is unsure:
entropy (nats) of its renormalised top-16 next-token probabilities at t given tokens[:t] above
`--entropy-threshold` (arXiv 2506.08007; docs/methods.md part B). Difficulty splits are the paper's
nested sets entropy > 0.5 / 1.0 / 1.5 = easy / medium / hard.

Four concerns, one module each: `format` (the task records, their file and reader, the splits),
`windows` (documents -> policy tokens -> scoring windows and candidate positions), `proxy` (the
proxy models and their top-16 entropy) and `builder` (the resumable build of the task files). This
package exports their public names. RLVR's problems with verifiable answers (tools/build_rl_data.py)
are `problems` (format and reader) and `problem_sources` (reasoning-gym and CHAMP -> problem files).
"""

from megatron_rpt.rpt.tasks.builder import KILL_ENV, BuildConfig, build_tasks, scan_documents
from megatron_rpt.rpt.tasks.format import FORMAT, SPLITS, Task, TaskError, load_tasks, splits_for
from megatron_rpt.rpt.tasks.problems import Problem, load_problems, task_file_kind
from megatron_rpt.rpt.tasks.proxy import (PROXY_DTYPES, TOP_K, HFProxy, MegatronProxy, check_vocabulary, score_windows,
                                          top_k_entropy)
from megatron_rpt.rpt.tasks.windows import (Document, Window, document_tokens, heldout_indices, iter_documents,
                                            plan_windows)

__all__ = ["FORMAT", "KILL_ENV", "PROXY_DTYPES", "SPLITS", "TOP_K", "BuildConfig", "Document", "HFProxy",
           "MegatronProxy", "Problem", "Task", "TaskError", "Window", "build_tasks", "check_vocabulary",
           "document_tokens", "heldout_indices", "iter_documents", "load_problems", "load_tasks", "plan_windows",
           "scan_documents", "score_windows", "splits_for", "task_file_kind", "top_k_entropy"]
