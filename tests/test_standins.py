"""The benchmarks' generated data, measured with the real Mistral tokenizer."""

import statistics

from bench import standins


def test_preference_pairs_are_about_1000_tokens(tiny_model):
    """Prompt and the longer answer, in Mistral's chat template: about 1,000 tokens (700 to 1,350), prompts 100 to 400,
    the longer answer 600 to 900; chosen and rejected differ, and the same seed gives the same rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # the real v1 tokenizer and Mistral's template
    rows = standins.preference_shaped_rows(200)
    assert rows == standins.preference_shaped_rows(200)

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def rendered(row: dict, answer: str) -> int:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[answer]}]
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    prompts = [tokens(row["prompt"]) for row in rows]
    longer = [max(tokens(row["chosen"]), tokens(row["rejected"])) for row in rows]
    whole = [max(rendered(row, "chosen"), rendered(row, "rejected")) for row in rows]
    assert 90 <= min(prompts) and max(prompts) <= 430, (min(prompts), max(prompts))
    assert 570 <= min(longer) and max(longer) <= 930, (min(longer), max(longer))
    assert 700 <= min(whole) and max(whole) <= 1350 and 950 <= statistics.mean(whole) <= 1050
    assert all(row["chosen"] != row["rejected"] for row in rows)
