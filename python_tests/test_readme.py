"""The README's training-loop snippet runs as written (so the README stays true)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section_code(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under '## {heading}'"
    return blocks[0]


def test_training_loop_snippet_runs(capsys):
    namespace: dict = {}
    exec(compile(_section_code("Use it in your training loop"), str(README), "exec"), namespace)
    assert "['adv', 'ce', 'energy', 'loss', 'xmax_grad_ratio']" in capsys.readouterr().out
    model = namespace["model"]
    # the snippet trained: every parameter received a gradient
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())


def test_train_step_snippet_runs(capsys, recwarn):
    exec(compile(_section_code("A whole step in one CUDA graph: `TrainStep`"), str(README), "exec"), {})
    loss = float(capsys.readouterr().out.split("loss ")[1])
    assert loss > 0 and loss == loss
