"""A pretrained chat model's general ability, offline: what fine-tuning may make it forget.

Two measures, both on text the fine-tuning data (Python source) never shows:

- ``prose_loss``: mean loss per token on held-out English prose this machine carries offline: Python's own
  ``LICENSE.txt`` and the licence texts of a Debian installation (``/usr/share/common-licenses``), the first
  ``blocks_per_text`` blocks of ``seq_len`` tokens of each. Perplexity is ``exp(prose_loss)``.
- ``qa_loss``: mean loss per token of fixed answers to fixed general-knowledge questions (:data:`QUESTIONS`),
  each asked through the model's chat template, the answer followed by the end-of-turn token. A model that
  forgets how to answer in plain English, or what it knew, assigns its old answers a lower likelihood.

Forgetting is the rise of each loss over the base model's. ``python benchmarks/general_ability.py`` prints
both for SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

PROSE_FILES = ("Apache-2.0", "GPL-3", "LGPL-3", "MPL-2.0", "GFDL-1.3", "Artistic")
LICENSES = Path("/usr/share/common-licenses")

QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the largest planet in our solar system?", "The largest planet in our solar system is Jupiter."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("How many hours are there in a day?", "There are 24 hours in a day."),
    ("How many months are there in a year?", "There are twelve months in a year."),
    ("What is the boiling point of water at sea level in degrees Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the freezing point of water in degrees Celsius?", "Water freezes at 0 degrees Celsius."),
    ("What is the chemical symbol for water?", "The chemical formula for water is H2O."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("What gas do humans need to breathe to live?", "Humans need oxygen to live."),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is Mount Everest."),
    ("What is the longest river in Africa?", "The longest river in Africa is the Nile."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by Albert Einstein."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is ten times ten?", "Ten times ten is one hundred."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What do bees make?", "Bees make honey."),
    ("What is the largest mammal?", "The largest mammal is the blue whale."),
    ("What is the fastest land animal?", "The fastest land animal is the cheetah."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What is the main language spoken in Brazil?", "The main language spoken in Brazil is Portuguese."),
    ("What currency is used in the United States?", "The currency of the United States is the US dollar."),
    ("On which continent is Egypt?", "Egypt is in Africa."),
    ("What is the hardest natural substance?", "The hardest natural substance is diamond."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the first letter of the English alphabet?", "The first letter of the English alphabet is A."),
)


def prose_texts() -> dict[str, str]:
    """The English texts of ``prose_loss`` that exist here (Python's licence always does)."""
    texts = {"python-LICENSE": (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")}
    for name in PROSE_FILES:
        path = LICENSES / name
        if path.is_file():
            texts[name] = path.read_text(encoding="utf-8")
    return texts


class GeneralAbility:
    """Fixed prose blocks and question-answer pairs, tokenized once for ``tokenizer``; :meth:`evaluate` a model."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, seq_len: int = 256, blocks_per_text: int = 4) -> None:
        self.texts = sorted(prose_texts())
        blocks = []
        for name in self.texts:
            ids = tokenizer(prose_texts()[name], add_special_tokens=False)["input_ids"]
            blocks += [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:blocks_per_text]
        self.prose = torch.tensor(blocks, dtype=torch.long)
        self.qa = [self._qa_example(tokenizer, question, answer) for question, answer in QUESTIONS]

    @staticmethod
    def _qa_example(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[Tensor, Tensor]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
        return ids, labels

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 4) -> dict[str, float]:
        """``{"prose_loss", "qa_loss"}``: mean loss per predicted token (the model's mode is restored)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = count = 0.0
        for block in self.prose.split(batch_size):
            block = block.to(device)
            n = block[:, 1:].numel()
            total += float(model(input_ids=block, labels=block).loss) * n
            count += n
        prose = total / count
        total = count = 0.0
        for ids, labels in self.qa:
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids.to(device), labels=labels.to(device)).loss) * n
            count += n
        model.train(was_training)
        return {"prose_loss": prose, "qa_loss": total / count}


def main() -> None:
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_lightning.models import smollm2_directory

    directory = smollm2_directory()
    ability = GeneralAbility(AutoTokenizer.from_pretrained(directory))
    scores = ability.evaluate(AutoModelForCausalLM.from_pretrained(directory))
    print(f"SmolLM2-135M-Instruct on {len(ability.prose)} prose blocks of {', '.join(ability.texts)}:")
    print(f"  prose loss {scores['prose_loss']:.4f} (perplexity {math.exp(scores['prose_loss']):.2f})")
    print(f"  QA answer loss {scores['qa_loss']:.4f} over {len(ability.qa)} questions")


if __name__ == "__main__":
    main()
