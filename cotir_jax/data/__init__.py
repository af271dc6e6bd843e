"""CoTIR-Bench input pipeline on grain: deterministic for a seed, checkpointable, sharded per
process. See pipeline.py for the loop API."""

from cotir_jax.data.decode import REASONS, TEXT_FIELDS, RawRecord, SkipSample, process_record, resize_bilinear
from cotir_jax.data.mixing import StreamOrder
from cotir_jax.data.paired import PairSource, list_pairs
from cotir_jax.data.pipeline import (CotirIterator, SkipFractionError, load_state, make_iterator,
                                     make_prompt_bank, make_source, merge_states, per_process_batch,
                                     stage_of_step, start_position)
from cotir_jax.data.prompts import (PromptBank, PromptFileError, normalize_deg, parse_answer, pick_prompts,
                                    weighted_pick)
from cotir_jax.data.sources import DataLayoutError, TarSource, resolve_layout

__all__ = [
    "REASONS", "TEXT_FIELDS", "RawRecord", "SkipSample", "process_record", "resize_bilinear", "StreamOrder",
    "CotirIterator", "SkipFractionError", "load_state", "make_iterator", "make_prompt_bank", "make_source",
    "merge_states", "per_process_batch", "stage_of_step", "start_position", "PromptBank", "normalize_deg", "parse_answer",
    "pick_prompts", "weighted_pick", "TarSource", "resolve_layout", "PromptFileError", "DataLayoutError",
    "PairSource", "list_pairs",
]
