"""PrismTokenizer: the run's sentencepiece model (an export's tokenizer.model) as a transformers tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class PrismTokenizer(PreTrainedTokenizer):
    """The ids of data_prep.tokenizer.Tokenizer (sentencepiece's own encoding of the whole text, no BOS or
    EOS added), so text reaches the model as its training data did. Text that spells a special token
    ("</s>") is encoded as text, as in training."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        self.vocab_file = vocab_file
        self.pieces = spm.SentencePieceProcessor(model_file=vocab_file)
        special = {name: self.pieces.id_to_piece(i) for name, i in (
            ("bos_token", self.pieces.bos_id()), ("eos_token", self.pieces.eos_id()),
            ("unk_token", self.pieces.unk_id()), ("pad_token", self.pieces.pad_id())) if i >= 0}
        super().__init__(**{**special, "split_special_tokens": True, "clean_up_tokenization_spaces": False, **kwargs})

    @property
    def vocab_size(self) -> int:
        return self.pieces.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.pieces.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.pieces.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.pieces.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.pieces.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # sentencepiece decodes control pieces (</s>) to nothing; transformers shows special tokens that are
        # not skipped (lm-eval's stop sequence for EOS is its text, which must not be empty).
        text, run = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                text, run = text + self.pieces.decode(run) + token, []
            else:
                run.append(token)
        return text + self.pieces.decode(run)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}tokenizer.model"
        if Path(self.vocab_file).resolve() != out.resolve():
            shutil.copyfile(self.vocab_file, out)
        return (str(out),)
