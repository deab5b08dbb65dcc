"""Generation with a Chameleon model: text, images, or both, with classifier-free guidance.

    gen = Generator(graphdef, model_cfg, vocab, GenerationConfig(max_new_tokens=64))
    out = gen(params, prompts, seed=0)            # prompts: list of id lists, or [B, P] + segment ids
    answer(checkpoint, "a red circle", out_dir, mode="image")   # from a stored run, to a folder

    decoding.py  Generator: prefill, then KV-cached decoding in one jitted while_loop (CFG streams)
    answer.py    one prompt from a checkpoint: tokenizer + VQ-GAN + params -> output folder
    __main__.py  python -m chameleon_jax.generate
Sampling (temperature, top-k/p, the modality grammar, guidance) is `chameleon_jax.sampling`.
"""
from chameleon_jax.generate.answer import answer, build_prompt
from chameleon_jax.generate.decoding import (GUIDANCE_STREAMS, GenerationConfig, GenerationOutput, Generator,
                                             pad_prompts)
from chameleon_jax.sampling import SamplingParams

__all__ = ["GUIDANCE_STREAMS", "GenerationConfig", "GenerationOutput", "Generator", "SamplingParams", "answer",
           "build_prompt", "pad_prompts"]
