"""Sampling: SamplingParams and the sampler that turns logits into tokens and logprobs."""
