"""The README's first command: the sample text in examples/ answers its question."""

from pathlib import Path

from ltri import Session

SAMPLE = Path(__file__).parent.parent / "examples" / "harbour_town.txt"


def test_sample_question_from_the_readme(smollm):
    model, tokenizer = smollm
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    question = "What is the code to open the harbour gate?"
    assert f'--context examples/harbour_town.txt "{question}"' in readme
    session = Session(model, tokenizer=tokenizer)
    session.feed(SAMPLE.read_text())
    assert "4 7 1 9" in session.ask(question, max_new_tokens=32)
