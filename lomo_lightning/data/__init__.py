"""Data modules for causal-LM pretraining, instruction tuning and preference pairs, with Hugging Face style batches."""

from lomo_lightning.data.base import TokenizedDataModule
from lomo_lightning.data.instructions import (
    IGNORE_INDEX,
    HFInstructionDataModule,
    InstructionCollator,
    InstructionDataModule,
    JsonInstructionDataModule,
    PyInstructDataModule,
    format_example,
    format_prompt,
    function_examples,
    render_prompt,
)
from lomo_lightning.data.preferences import (
    HFPreferenceDataModule,
    JsonPreferenceDataModule,
    PreferenceCollator,
    PreferencePairs,
    PyPreferenceDataModule,
)
from lomo_lightning.data.python_stdlib import PythonStdlibDataModule
from lomo_lightning.data.resumable import ResumableDataLoader
from lomo_lightning.data.stdlib import split_files, split_halves, stdlib_source_files
from lomo_lightning.data.tokenizer import default_cache_dir, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "HFInstructionDataModule",
    "HFPreferenceDataModule",
    "InstructionCollator",
    "InstructionDataModule",
    "JsonInstructionDataModule",
    "JsonPreferenceDataModule",
    "PreferenceCollator",
    "PreferencePairs",
    "PyInstructDataModule",
    "PyPreferenceDataModule",
    "PythonStdlibDataModule",
    "ResumableDataLoader",
    "TokenizedDataModule",
    "default_cache_dir",
    "format_example",
    "format_prompt",
    "function_examples",
    "load_tokenizer",
    "render_prompt",
    "split_files",
    "split_halves",
    "stdlib_source_files",
]
