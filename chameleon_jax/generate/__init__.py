"""Generation with a Chameleon model: text, images, or both, with classifier-free guidance.

    gen = Generator(graphdef, model_cfg, vocab, GenerationConfig(max_new_tokens=64))
    out = gen(params, prompts, seed=0)            # prompts: list of id lists, or [B, P] + segment ids
    answer(checkpoint, "a red circle", out_dir, mode="image")   # from a stored run, to a folder

    decoding.py  Generator: prefill, then KV-cached decoding in one jitted while_loop (CFG streams)
    answer.py    a checkpoint onto a mesh (load), prompts -> ids -> one batch decoded (generate_batch),
                 one prompt to a folder (answer)
    batch.py     a JSONL file of prompts -> answers in folders + OUT/index.html (bad lines counted, skipped)
    benchmark.py captioning / VQA eval sets (JSONL + images) -> greedy answers -> CIDEr / VQA accuracy with
                 intervals (`python -m chameleon_jax.eval --eval_set`)
    streaming.py TextStream: the text printed as the loop produces it (Generator's on_step)
    page.py      the HTML page: each prompt, then its text and images in order
    __main__.py  python -m chameleon_jax.generate
Sampling (temperature, top-k/p, the modality grammar, guidance) is `chameleon_jax.sampling`.
"""
from chameleon_jax.generate.answer import answer, build_prompt
from chameleon_jax.generate.decoding import (GUIDANCE_STREAMS, GenerationConfig, GenerationOutput, Generator,
                                             pad_prompts)
from chameleon_jax.sampling import SamplingParams

__all__ = ["GUIDANCE_STREAMS", "GenerationConfig", "GenerationOutput", "Generator", "SamplingParams", "answer",
           "build_prompt", "pad_prompts"]
