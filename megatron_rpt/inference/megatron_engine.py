"""The embedded rollout engine: Megatron-Core's inference engine on the training model's own weights.

Colocated and copy-free: the engine wraps the very `GPTModel` the optimizer updates (no weight
copy, no conversion, so `sync_weights` is a no-op), with Megatron-Core's static-batch engine
(`StaticInferenceEngine` + `TextGenerationController` + `GPTInferenceWrapper` + a
`StaticInferenceContext` KV cache). Every rank of a model-parallel group runs it with the same
prompts (TP ranks share gathered logits and a sampling generator seeded alike, so they sample the
same tokens; PP stages receive the last stage's logits); data-parallel ranks run their own prompts.

What is returned per sampled token is log_softmax(z / T) of the full (padded-vocabulary) logits at
the sampling temperature T (fp32, as Megatron-Core's sampler divides them), the convention of
`inference.base`, recorded at each sampling step by a
`TextGenerationController` subclass (cheaper than Megatron-Core's `return_log_probs`, which
materialises the prompt's full-vocabulary logits, and it covers the terminating EOD).

Expert parallelism (`lockstep_group`): the expert all-to-alls make every forward of the engine a
collective over the ranks of an expert-parallel group, which hold different data-parallel prompts,
so they must run the same number of forwards. Megatron-Core's static batch runs one forward per
position from the batch's shortest prompt to its longest prompt plus the budget, and stops early
when every row ended at EOD. In lockstep every rank of the group runs the same number of static
batches with the same row count (padding rows and, where needed, padding batches), two padding rows
give every batch the group's shortest and longest prompt lengths, and a batch stops only when every
rank's rows are done (the ranks whose rows ended keep decoding padding, never recorded).

Sampling is reproducible: the controller's generator is reseeded from `SamplingConfig.seed` on
every call, so a resumed run samples the same rollouts. Megatron-Core's static engine takes top-k
or top-p, not both; top-k = 1 is greedy.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Sequence

import torch

from megatron_rpt.distributed import max_over_ranks
from megatron_rpt.inference.base import Rollout, RolloutEngine, RolloutError, SamplingConfig


def _inference_wrapper(model, *, hidden_size: int, params_dtype: torch.dtype, padded_vocab_size: int,
                       max_batch_size: int, max_sequence_length: int):
    """GPTInferenceWrapper + StaticInferenceContext across megatron-core versions (0.16 takes an
    InferenceWrapperConfig; later versions read the model's config and deprecate that argument)."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    context = StaticInferenceContext(max_batch_size, max_sequence_length)
    if "inference_wrapper_config" in inspect.signature(GPTInferenceWrapper.__init__).parameters:
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
        config = InferenceWrapperConfig(
            hidden_size=hidden_size, params_dtype=params_dtype,
            # The whole batch is one forward per pipeline step (no micro-batching of rollouts).
            inference_batch_times_seqlen_threshold=max_batch_size * max_sequence_length + 1,
            padded_vocab_size=padded_vocab_size, inference_max_requests=max_batch_size,
            inference_max_seq_length=max_sequence_length)
        return GPTInferenceWrapper(model, config, context)
    wrapper = GPTInferenceWrapper(model, context)
    _undo_fp8_inference_padding(model)
    return wrapper


def _undo_fp8_inference_padding(model) -> int:
    """Give the TE linear layers of `model` their own forward back; returns how many were rewired.

    With FP8, megatron-core >= 0.19's inference wrapper rewires every TE linear layer of the model for
    good (fp8_utils.prepare_model_for_fp8_inference: an instance `forward` that pads the sequence and,
    under sequence parallelism, does its own all-gather / reduce-scatter). Here the model is also the
    trainer's, whose forwards must stay Megatron's; the engine pads its batches itself (`row_multiple`),
    which keeps every FP8 GEMM aligned in prefill and decode."""
    try:
        from megatron.core import fp8_utils
        wrapped = fp8_utils._fp8_inference_wrapped_modules
    except (ImportError, AttributeError):
        return 0
    undone = 0
    for module in model.modules():
        if module in wrapped:
            module.__dict__.pop("forward", None)
            wrapped.discard(module)
            undone += 1
    return undone


def _inference_mode_flag():
    """Megatron-Core's process-wide `InferenceMode` flag (megatron-core >= 0.19; None before).

    0.19's `StaticInferenceEngine.__init__` sets it and nothing unsets it (static_engine.py); while it
    is set every GPTModel forward takes the inference path (`_postprocess` asserts
    runtime_gather_output, "Inference must always gather TP logits"), which breaks the training
    forwards of the colocated model. 0.16 derived the mode per call (inference_context given and
    model.eval()). The engine keeps the flag set only while it generates."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return None
    return InferenceMode if hasattr(InferenceMode, "is_active") else None


@contextlib.contextmanager
def _inference_mode(active: bool):
    """Set (or clear) the InferenceMode flag for the block, then restore its previous value."""
    flag = _inference_mode_flag()
    if flag is None:
        yield
        return
    before = flag.is_active()
    (flag.set_active if active else flag.unset_active)()
    try:
        yield
    finally:
        (flag.set_active if before else flag.unset_active)()


def _recording_controller_class():
    """TextGenerationController that records log pi(sampled token) at every sampling step.

    Megatron-Core's own `return_log_probs` makes the static engine materialise [batch, prompt,
    vocabulary] logits at prefill for the prompt's log-probs (gigabytes for long prompts and large
    vocabularies) and drops the terminating EOD's. Here only the last position's log_softmax is
    taken, at the token the controller actually sampled, for the requests whose generation has started;
    it is taken of the raw logits divided by `temperature` (set per call) before the sampler runs, so
    whatever the sampler does to its logits (temperature, top-k/top-p masks) is not part of it."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController)

    class RecordingController(TextGenerationController):
        temperature = 1.0

        def sample_from_logits(self, last_token_logits, *args, **kwargs):
            log_softmax = torch.log_softmax(last_token_logits.float() / self.temperature, dim=-1)
            tokens = super().sample_from_logits(last_token_logits, *args, **kwargs)
            started = kwargs.get("generation_started")
            if started is None:
                started = torch.ones(tokens.shape[0], dtype=torch.bool)
            log_probs = log_softmax.gather(-1, tokens.view(-1, 1).to(last_token_logits.device)).view(-1)
            self.recorded.append((log_probs.cpu(), started.cpu()))
            return tokens

        lockstep_group = None    # a process group: stop a batch only when every rank's rows are done
        _done = None             # this batch's own done flags (what the upstream loop is told may differ)

        def update_generation_status(self, *args, **kwargs):
            if self.lockstep_group is None:
                return super().update_generation_status(*args, **kwargs)
            if self._done is not None:   # the rows' true state, not the "not yet" the loop was told
                kwargs["is_generation_done_tensor"] = self._done
            done, lengths = super().update_generation_status(*args, **kwargs)
            self._done = done
            pending = max_over_ranks([not bool(done.all())], done.device, self.lockstep_group)[0]
            # lengths stop growing at each row's own EOD (computed from the true flags above)
            return (torch.zeros_like(done) if pending else done), lengths

    return RecordingController


class MegatronEngine(RolloutEngine):
    """Rollouts from Megatron-Core's static-batch engine on the trainer's model (collective over
    the model-parallel group; see the module docstring)."""

    name = "megatron"

    def __init__(self, model_chunks: Sequence[torch.nn.Module], tokenizer, *, padded_vocab_size: int,
                 max_batch_size: int, max_sequence_length: int, row_multiple: int = 1, lockstep_group=None):
        from megatron.core.inference.engines import StaticInferenceEngine

        from megatron_rpt.models.gpt import unwrap

        if len(model_chunks) != 1:
            raise RolloutError(f"the embedded engine needs one model chunk per rank, got {len(model_chunks)} "
                               "(virtual pipeline stages are not supported by Megatron-Core's inference)")
        if max_batch_size < 1 or max_sequence_length < 2 or row_multiple < 1 or max_batch_size % row_multiple:
            raise RolloutError(f"bad engine sizes: max_batch_size={max_batch_size}, "
                               f"max_sequence_length={max_sequence_length}, row_multiple={row_multiple} "
                               "(the batch size must be a multiple of row_multiple)")
        device = next(unwrap(model_chunks[0]).parameters()).device
        if device.type != "cuda" and torch.distributed.is_initialized():
            from megatron.core import parallel_state
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                # Megatron-Core's inference passes activations between stages only as CUDA tensors
                # (inference/communication_utils.py asserts tensor.is_cuda, 0.16 and 0.19).
                raise RolloutError(f"the embedded engine with pipeline parallelism needs CUDA: Megatron-Core's "
                                   f"inference sends activations between stages as CUDA tensors only, and this "
                                   f"model is on {device.type}; use --pipeline-model-parallel-size 1 or "
                                   "--rollout-engine openai")
        if lockstep_group is not None and max_batch_size < 3:
            raise RolloutError(f"max_batch_size={max_batch_size}: in lockstep (expert parallelism) a static batch "
                               "needs room for two padding rows besides a request; use >= 3")
        # Every static batch is padded to this many rows (with copies of its first request, dropped from
        # the results): FP8 GEMMs need row counts divisible by 16, and a decode step has one row per request.
        self.row_multiple = row_multiple
        self.model_chunks = list(model_chunks)
        self.model = unwrap(self.model_chunks[0])
        self.tokenizer = tokenizer
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length
        self.padded_vocab_size = padded_vocab_size
        config = self.model.config
        self._wrapped = _inference_wrapper(
            self.model, hidden_size=config.hidden_size, params_dtype=config.params_dtype,
            padded_vocab_size=padded_vocab_size, max_batch_size=max_batch_size,
            max_sequence_length=max_sequence_length)
        self.controller = _recording_controller_class()(self._wrapped, tokenizer)
        self.controller.recorded = []
        self.controller.lockstep_group = lockstep_group
        self.lockstep_group = lockstep_group
        self.model_device = device
        # legacy: the static-batch path itself (megatron-core >= 0.15 otherwise builds its dynamic
        # engine, which needs flash-attn on CUDA and cannot run on CPU).
        with _inference_mode(False):  # 0.19 sets the process-wide flag here and never clears it
            self.engine = StaticInferenceEngine(self.controller, max_batch_size=max_batch_size, legacy=True)
        # The static engine opens a tqdm bar per call ("static requests"): noise in a training log.
        import megatron.core.inference.engines.static_engine as static_engine
        if not getattr(static_engine.tqdm, "_mrpt_quiet", False):
            quiet = functools.partial(static_engine.tqdm, disable=True)
            quiet._mrpt_quiet = True
            static_engine.tqdm = quiet
        self._request_id = 0

    def _sampling_params(self, sampling: SamplingConfig):
        from megatron.core.inference.sampling_params import SamplingParams

        top_k, top_p = sampling.top_k, (0.0 if sampling.top_p >= 1.0 else sampling.top_p)
        if top_k > 0 and top_p > 0.0:
            raise RolloutError("the Megatron-Core engine takes top-k or top-p, not both "
                               f"(got top_k={top_k}, top_p={sampling.top_p})")
        params = SamplingParams(temperature=sampling.temperature, top_k=top_k, top_p=top_p,
                                return_log_probs=False, num_tokens_to_generate=sampling.max_new_tokens)
        if not sampling.stop_at_eod:
            params.add_attributes({"no_early_termination": True})
        return params

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> list[list[Rollout]]:
        from megatron.core.inference.inference_request import InferenceRequest

        if n < 1:
            raise RolloutError(f"n must be >= 1, got {n}")
        params = self._sampling_params(sampling)
        requests = []
        for i, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise RolloutError(f"prompt {i} is empty")
            if len(prompt) + sampling.max_new_tokens > self.max_sequence_length:
                raise RolloutError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={sampling.max_new_tokens} it "
                    f"exceeds the engine's max sequence length {self.max_sequence_length} "
                    "(raise --seq-length or drop long contexts when building the tasks)")
            bad = [t for t in prompt if not 0 <= t < self.padded_vocab_size]
            if bad:
                raise RolloutError(f"prompt {i} has token ids outside the vocabulary: {bad[:5]}")
            for _ in range(n):
                self._request_id += 1
                requests.append(InferenceRequest(request_id=str(self._request_id), prompt="",
                                                 sampling_params=params, prompt_tokens=prompt))
        self.controller.sampling_rng.manual_seed(int(sampling.seed))
        self.controller.temperature = float(sampling.temperature)
        was_training = [chunk.training for chunk in self.model_chunks]
        out: list[list[Rollout]] = [[] for _ in prompts]
        eod = self.tokenizer.eod
        try:
            # One static batch per call of the engine, so the recorded sampling steps belong to it.
            for start, batch, real in self._static_batches(requests, params):
                self.controller.recorded = []
                self.controller._done = None
                with _inference_mode(True):
                    done = self.engine.generate(inference_requests=batch)
                done = done[:real]
                steps = self.controller.recorded
                for row, request in enumerate(done):
                    k = start + row
                    n_gen = int(request.generated_length)
                    tokens = [int(t) for t in request.generated_tokens.tolist()][:n_gen]
                    # Megatron-Core counts the tokens before a terminating EOD; a response shorter than
                    # the budget ended at EOD, which is part of the response (the policy learns to stop).
                    finished = sampling.stop_at_eod and n_gen < sampling.max_new_tokens
                    if finished:
                        tokens.append(eod)
                    mine = [float(lp[row]) for lp, started in steps if bool(started[row])][:len(tokens)]
                    if len(mine) != len(tokens):
                        raise RolloutError(f"recorded {len(mine)} log-probs for {len(tokens)} generated tokens")
                    text = self.tokenizer.detokenize(tokens[:-1] if finished else tokens)
                    out[k // n].append(Rollout(tokens=tokens, log_probs=mine, text=text, finished=finished))
        finally:
            self.controller.recorded = []
            for chunk, training in zip(self.model_chunks, was_training):
                chunk.train(training)
            # The KV cache lives in the context until the next prefill; give the memory back now.
            self._wrapped.inference_context.key_value_memory_dict = {}
        return out

    def _static_batches(self, requests: list, params):
        """(index of the first request, the static batch to run, how many of its rows are requests):
        batches padded to the row multiple with copies of a request (dropped from the results); in
        lockstep, also to the group's row count, shortest and longest prompt, and batch count (see the
        module docstring)."""
        from megatron.core.inference.inference_request import InferenceRequest

        def pad_request(prompt: list):
            self._request_id += 1
            return InferenceRequest(request_id=str(self._request_id), prompt="", sampling_params=params,
                                    prompt_tokens=list(prompt))

        size = self.max_batch_size - (2 if self.lockstep_group is not None else 0)
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        count = len(chunks)
        if self.lockstep_group is not None:
            count = max_over_ranks([count], self.model_device, self.lockstep_group)[0]
        for b in range(count):
            batch = list(chunks[b]) if b < len(chunks) else []
            real = len(batch)
            rows = real
            if self.lockstep_group is not None:
                lengths = [len(r.prompt_tokens) for r in batch]
                most, neg_shortest, longest = max_over_ranks(
                    [real + 2, -min(lengths, default=self.max_sequence_length), max(lengths, default=1)],
                    self.model_device, self.lockstep_group)
                template = list(batch[0].prompt_tokens) if batch else (
                    list(requests[0].prompt_tokens) if requests else [0])
                for length in (-neg_shortest, longest):   # valid ids of the template, repeated to the length
                    batch.append(pad_request((template * -(-length // len(template)))[:length]))
                rows = most
            rows += -rows % self.row_multiple
            while len(batch) < rows:
                batch.append(pad_request(batch[0].prompt_tokens))
            yield b * size, batch, real

    def close(self) -> None:
        self._wrapped.inference_context.key_value_memory_dict = {}
