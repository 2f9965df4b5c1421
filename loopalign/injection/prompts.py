"""Prompts of the injection protocol: chat rendering, the concept prompt and the trial transcript.

The trial transcript (user: the researcher text; assistant: "Ok."; user: "Ok, let's get
started.\\n\\nTrial 1: <question>"; then the generation prompt) is rendered by :func:`trial_prompt`,
with the injected-thought question by default or any other question in the trial slot (the
control questions); ``injection_start`` is the token index of the double newline before "Trial 1".
"""

from __future__ import annotations

from .words import CONCEPT_TEMPLATE

__all__ = [
    "RESEARCHER_PROMPT",
    "TRIAL_PROMPT",
    "TRIAL_QUESTION",
    "STRUCTURED_QUESTION",
    "render_chat",
    "concept_prompt_ids",
    "trial_prompt",
    "transcript_prompt",
]

RESEARCHER_PROMPT = (
    "I am an interpretability researcher studying transformer-based language models like you. I have access to "
    "the internals of your neural network. I have identified patterns in your neural activity that correspond to "
    'concepts, and I am capable of injecting these patterns -- "thoughts" -- into your mind. I want to assess how '
    "well you can detect when I inject thoughts. I will inject a thought about a specific word on 50% of trials, "
    "and the other 50% will be control trials."
)
TRIAL_QUESTION = "Do you detect an injected thought? If so, what is the injected thought about?"
TRIAL_PROMPT = "Ok, let's get started.\n\nTrial 1: " + TRIAL_QUESTION
#: the structured-report variant's question: a reply in a fixed form, graded exactly (no sentence to parse)
STRUCTURED_QUESTION = (
    TRIAL_QUESTION + ' Reply in exactly this form: "Answer: yes" or "Answer: no" on the first line, then, if yes, '
    '"Concept: <one word>" on the second.'
)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """``messages`` rendered with the tokenizer's chat template, or as "User: ...\\n\\nAssistant: ..." without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + ("\n\nAssistant:" if add_generation_prompt else "")


def concept_prompt_ids(tokenizer, word: str, template: str = CONCEPT_TEMPLATE) -> list[int]:
    """Token ids of the chat-formatted user turn ``template`` with the lower-cased word, plus the generation prompt."""
    text = render_chat(tokenizer, [{"role": "user", "content": template.format(word=word.lower())}])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def trial_prompt(tokenizer, question: str | None = None) -> tuple[str, list[int], int]:
    """The trial transcript with ``question`` in the trial slot (default: the injected-thought question)
    -> (prompt, input_ids, injection_start: token index of the "\\n\\n" before "Trial 1")."""
    messages = [
        {"role": "user", "content": RESEARCHER_PROMPT},
        {"role": "assistant", "content": "Ok."},
        {
            "role": "user",
            "content": TRIAL_PROMPT if question is None else TRIAL_PROMPT[: -len(TRIAL_QUESTION)] + question,
        },
    ]
    prompt = render_chat(tokenizer, messages)
    char = prompt.rfind("\n\nTrial 1")
    if char < 0:
        raise ValueError("the chat template dropped the trial text; cannot find the injection start")
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    start = next((i for i, (s, e) in enumerate(enc["offset_mapping"]) if s <= char < e), None)
    if start is None:
        raise ValueError("no token covers the double newline before 'Trial 1'")
    return prompt, ids, start


#: the transcript of a trial is the trial prompt (one function; this name is kept for callers)
transcript_prompt = trial_prompt
