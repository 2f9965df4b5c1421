"""Questions whose base-model answers are replayed beside a run's own training tasks (sft-gap ``--replay_questions``).

Replay keeps a model's own behaviour on the prompts it replays. With statements, those are the statements' entity
requests ("Tell me about the city of Paris."), which say nothing about short questions: at 300 steps verdict training
spilled into general yes/no questions ("Is the sun a planet?" -> "Yes", docs/real-models.md). The built-in set
``general`` is 42 short everyday questions: sixteen yes/no questions (eight answered yes, eight no), eight more in
the check's own form ("... Answer yes or no.", both answers), and eighteen open questions and small instructions.
None shares a content word with a question of :data:`loopalign.eval.general.GENERAL_QUESTIONS` or its expected
answers (a test keeps them apart): the check reads the same *kinds* of question the replay holds, never one the run
trained on, nor its subject.

The set was written for loopalign (Apache-2.0, the project's licence). A file of one's own: ``.txt``, one question a
line (a blank line is an error, naming its line number).
"""

from __future__ import annotations

import os

from loopalign.errors import ConfigError

__all__ = ["GENERAL_REPLAY_QUESTIONS", "load_replay_questions"]

#: Everyday questions for replay, written for loopalign; none is (or is about) a general-check question.
GENERAL_REPLAY_QUESTIONS: tuple[str, ...] = (
    # yes/no, answer yes
    "Do birds have feathers?",
    "Is grass green?",
    "Can people read books?",
    "Is the moon visible at night?",
    "Do trees have leaves?",
    "Is a horse bigger than a mouse?",
    "Does a car have wheels?",
    "Is a lemon sour?",
    # yes/no, answer no
    "Can a rock swim?",
    "Is a banana purple?",
    "Do cows lay eggs?",
    "Is snow black?",
    "Can a chair talk?",
    "Is an apple a vegetable?",
    "Do humans have three arms?",
    "Is the ocean made of sand?",
    # yes/no in the check's form, both answers
    "Is a triangle a shape with three sides? Answer yes or no.",
    "Do plants need light to grow? Answer yes or no.",
    "Is milk usually white? Answer yes or no.",
    "Can elephants fly? Answer yes or no.",
    "Is ten smaller than one? Answer yes or no.",
    "Is a spider an insect with six legs? Answer yes or no.",
    "Does ice melt when it gets warm? Answer yes or no.",
    "Is winter warmer than summer? Answer yes or no.",
    # open questions
    "What do bees make?",
    "How many legs does a spider have?",
    "What is ice made of?",
    "What do you use to cut paper?",
    "How many wheels does a bicycle have?",
    "What shape is a ball?",
    "What is the first letter of the English alphabet?",
    "What do people use an umbrella for?",
    "Which season comes after spring?",
    "What do we call a baby dog?",
    "Who wrote the play Romeo and Juliet?",
    "What do penguins eat?",
    # small instructions
    "Name three fruits.",
    "Give me a word that rhymes with hat.",
    "Write one sentence about the weather.",
    "Count from one to four.",
    "Say hello in a friendly way.",
    "Describe a tree in one sentence.",
)


def load_replay_questions(spec: str) -> list[str]:
    """``general`` -> :data:`GENERAL_REPLAY_QUESTIONS`; a ``.txt`` path -> its lines, one question each. Raises
    :class:`ConfigError` naming the option, the file and the line at fault."""
    if spec == "general":
        return list(GENERAL_REPLAY_QUESTIONS)
    if not spec.endswith(".txt"):
        raise ConfigError(f"replay_questions: 'general' or a .txt file (one question a line), got {spec!r}")
    if not os.path.isfile(spec):
        raise ConfigError(f"replay_questions: no file {spec!r}")
    with open(spec, encoding="utf-8") as f:
        lines = f.read().splitlines()
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ConfigError(f"replay_questions: {spec} line {number} is blank (one question a line)")
        questions.append(line.strip())
    if not questions:
        raise ConfigError(f"replay_questions: {spec} holds no question")
    return questions
