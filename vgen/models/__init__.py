"""vgen's own networks: the reference text-to-video model (Wan format), trained by ``python -m vgen.models.train``.

::

    from vgen.models import REFERENCE, build_reference_pipeline, weight_bytes
    REFERENCE.video_tokens()            # 9216: 33 x 256 x 256 -> 9 x 64 x 64 latents -> 9 x 32 x 32 tokens
    weight_bytes(REFERENCE)["total"]    # bf16 bytes of the three networks
"""

from vgen.models.reference import (
    CONFIGS,
    REFERENCE,
    SPECIAL_TOKENS,
    TINY,
    ReferenceConfig,
    build_reference_pipeline,
    encode_prompts,
    folder_bytes,
    parameter_counts,
    reference_config,
    save_pipeline,
    weight_bytes,
    word_tokenizer,
)

__all__ = [
    "CONFIGS",
    "REFERENCE",
    "SPECIAL_TOKENS",
    "TINY",
    "ReferenceConfig",
    "build_reference_pipeline",
    "encode_prompts",
    "folder_bytes",
    "parameter_counts",
    "reference_config",
    "save_pipeline",
    "weight_bytes",
    "word_tokenizer",
]
