"""A pretrained chat model's general ability, offline: what fine-tuning may make it forget.

Two measures, both on text the fine-tuning data (Python source) never shows:

- ``prose_loss``: mean loss per token on held-out English prose this machine carries offline: Python's own
  ``LICENSE.txt`` and the licence texts of a Debian installation (``/usr/share/common-licenses``), the first
  ``blocks_per_text`` blocks of ``seq_len`` tokens of each. Perplexity is ``exp(prose_loss)``.
- ``qa_loss``: mean loss per token of fixed answers to fixed general-knowledge questions (:data:`QUESTIONS`),
  each asked through the model's chat template, the answer followed by the end-of-turn token. A model that
  forgets how to answer in plain English, or what it knew, assigns its old answers a lower likelihood.

- ``qa_greedy`` (only with ``evaluate(..., greedy=True)``): the share of :data:`ANSWER_KEYS`' questions whose
  greedy answer (at most ``max_new_tokens`` tokens) names an accepted answer (a whole-word match, case ignored).
  Losses can rise while answers stay right, or the reverse; this checks what the model actually says.

Forgetting is the rise of each loss (the fall of ``qa_greedy``) over the base model's.
``python benchmarks/general_ability.py`` prints all three for SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import re
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

# Accepted answers for the greedy check: a greedy answer is right when one of its question's keys appears in
# it as whole words (case ignored). The alphabet question is left out: its key "a" matches any article.
ANSWER_KEYS: dict[str, tuple[str, ...]] = {
    "What is the capital of France?": ("paris",),
    "What is the capital of Japan?": ("tokyo",),
    "What is the capital of Italy?": ("rome",),
    "What is the capital of Germany?": ("berlin",),
    "What is the capital of Spain?": ("madrid",),
    "What is the largest planet in our solar system?": ("jupiter",),
    "Which planet is known as the Red Planet?": ("mars",),
    "What is the closest star to Earth?": ("sun",),
    "How many days are there in a week?": ("seven", "7"),
    "How many hours are there in a day?": ("24", "twenty-four", "twenty four"),
    "How many months are there in a year?": ("twelve", "12"),
    "What is the boiling point of water at sea level in degrees Celsius?": ("100", "one hundred"),
    "What is the freezing point of water in degrees Celsius?": ("0", "zero"),
    "What is the chemical symbol for water?": ("h2o",),
    "What gas do plants absorb from the air?": ("carbon dioxide", "co2"),
    "What gas do humans need to breathe to live?": ("oxygen",),
    "What is the largest ocean on Earth?": ("pacific",),
    "What is the tallest mountain in the world?": ("everest",),
    "What is the longest river in Africa?": ("nile",),
    "Who wrote Romeo and Juliet?": ("shakespeare",),
    "Who painted the Mona Lisa?": ("leonardo", "da vinci"),
    "Who developed the theory of relativity?": ("einstein",),
    "What is two plus two?": ("four", "4"),
    "What is ten times ten?": ("one hundred", "100"),
    "What is the square root of 81?": ("nine", "9"),
    "How many sides does a triangle have?": ("three", "3"),
    "How many legs does a spider have?": ("eight", "8"),
    "What color is the sky on a clear day?": ("blue",),
    "What is the opposite of hot?": ("cold",),
    "What do bees make?": ("honey",),
    "What is the largest mammal?": ("blue whale",),
    "What is the fastest land animal?": ("cheetah",),
    "Which animal is known as the king of the jungle?": ("lion",),
    "What is the main language spoken in Brazil?": ("portuguese",),
    "What currency is used in the United States?": ("dollar", "dollars"),
    "On which continent is Egypt?": ("africa",),
    "What is the hardest natural substance?": ("diamond",),
    "What organ pumps blood through the body?": ("heart",),
    "How many continents are there?": ("seven", "7"),
}


def answer_is_right(answer: str, keys: tuple[str, ...]) -> bool:
    """Whether ``answer`` names one of ``keys`` as whole words, case ignored (``"7"`` is not found in ``"17"``)."""
    text = answer.lower()
    return any(re.search(rf"(?<![\w.]){re.escape(key)}(?![\w]|\.\d)", text) for key in keys)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """``question`` as the user's turn through the chat template, up to where the assistant's answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


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
        self.tokenizer = tokenizer

    @staticmethod
    def _qa_example(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[Tensor, Tensor]:
        prompt_ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
        return ids, labels

    @torch.no_grad()
    def greedy_answers(self, model: torch.nn.Module, max_new_tokens: int = 20) -> list[str]:
        """The model's greedy answers to :data:`ANSWER_KEYS`' questions, in its order, through the chat template.

        One left-padded batch, so every prompt ends at the same position and generation starts right after it.
        """
        tokenizer = self.tokenizer
        prompts = [chat_prompt(tokenizer, q) for q in ANSWER_KEYS]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = side
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(  # a Hugging Face (or peft) causal LM
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, use_cache=True,
        )
        start = batch["input_ids"].shape[1]
        return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in out]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 4, greedy: bool = False) -> dict[str, float]:
        """``{"prose_loss", "qa_loss"}``: mean loss per predicted token (the model's mode is restored).

        With ``greedy``, also ``qa_greedy``: the share of :data:`ANSWER_KEYS`' questions answered right.
        """
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
        scores = {"prose_loss": prose, "qa_loss": total / count}
        if greedy:
            answers = self.greedy_answers(model)
            right = [answer_is_right(a, keys) for a, keys in zip(answers, ANSWER_KEYS.values())]
            scores["qa_greedy"] = sum(right) / len(right)
        model.train(was_training)
        return scores


def main() -> None:
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_lightning.models import smollm2_directory

    directory = smollm2_directory()
    ability = GeneralAbility(AutoTokenizer.from_pretrained(directory))
    scores = ability.evaluate(AutoModelForCausalLM.from_pretrained(directory), greedy=True)
    print(f"SmolLM2-135M-Instruct on {len(ability.prose)} prose blocks of {', '.join(ability.texts)}:")
    print(f"  prose loss {scores['prose_loss']:.4f} (perplexity {math.exp(scores['prose_loss']):.2f})")
    print(f"  QA answer loss {scores['qa_loss']:.4f} over {len(ability.qa)} questions")
    print(f"  greedy answers right: {scores['qa_greedy']:.3f} of {len(ANSWER_KEYS)} questions")


if __name__ == "__main__":
    main()
