"""Can a small reader answer Shapes questions from a frozen vision tower's slots? A diagnostic, not a model.

It encodes Shapes scenes once with the tower of a saved model, then trains on the frozen features
(1) a per-slot probe: an MLP that reads the colour and shape of the object in each slot's cell (or "empty"), and
(2) question readers: a few of mmdlm's own decoder layers (RMSNorm, RoPE attention, SwiGLU) over
[9 projected slots, question words, <sep>], trained to classify the answer from the last position. Only the questions
are trained (one answer per row, cross-entropy on it alone), so a reader that fails here fails on the slots or the
architecture, and one that succeeds says the full model's shortfall lies in how it is trained.
Readers differ by how a slot's cell reaches it: "rope" (only through RoPE, as shapes-tiny), "slot" (a learned
embedding per slot added to the projected features, as ``image_slot_embeddings``).

    python benchmarks/slot_reader_probe.py --out benchmarks/results/slot-reader-probe
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import mmdlm
from mmdlm.configuration_mmdlm import MMDLMConfig
from mmdlm.data.shapes import COLORS, QUESTION_TYPES, SHAPES, ShapesWorld
from mmdlm.eval.evaluate import random_object_chance
from mmdlm.modeling_mmdlm import MMDLMModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOWER = ROOT / "benchmarks/results/recipe-sweep/round2-prefix/vision_pretrain"
READERS = ("rope", "slot")


def encode_scenes(model_path: str, split: str, n: int, batch_size: int = 250) -> tuple[torch.Tensor, list]:
    """Frozen tower features [n, slots, width] of the first ``n`` scenes of ``split`` and their (objects, questions)."""
    pipe = mmdlm.load(model_path, device="cpu")
    tower, processor = pipe.model.model.vision_tower.eval(), pipe.processor.image_processor
    world, feats, scenes = ShapesWorld(split, n), [], []
    for start in tqdm(range(0, n, batch_size), desc=f"encoding {split}", unit="batch"):
        samples = [world[i] for i in range(start, min(n, start + batch_size))]
        with torch.no_grad():
            feats.append(tower(processor([s.image for s in samples])["pixel_values"]).float())
        scenes.extend((s.scene.shapes, s.qas) for s in samples)
    return torch.cat(feats), scenes


def slot_probe(train: tuple, test: tuple, steps: int = 1500) -> dict[str, float]:
    """Per-slot MLP: colour (8 + empty) and shape (4 + empty) of the object in each slot's cell."""
    def targets(scenes):
        color = torch.full((len(scenes), 9), len(COLORS))
        shape = torch.full((len(scenes), 9), len(SHAPES))
        for i, (objects, _) in enumerate(scenes):
            for o in objects:
                color[i, o.cell], shape[i, o.cell] = list(COLORS).index(o.color), SHAPES.index(o.shape)
        return color, shape

    (x, scenes), (x_test, scenes_test) = train, test
    if x.shape[1] != 9:
        raise ValueError(f"the slot probe needs 9 slots (pool_grid 3), the tower gives {x.shape[1]}")
    color, shape = targets(scenes)
    nc = len(COLORS) + 1
    probe = nn.Sequential(nn.Linear(x.shape[-1], 256), nn.GELU(), nn.Linear(256, nc + len(SHAPES) + 1))
    opt = torch.optim.Adam(probe.parameters(), 1e-3)
    for _ in tqdm(range(steps), desc="slot probe", unit="step"):
        idx = torch.randint(len(x), (256,))
        out = probe(x[idx])
        loss = (F.cross_entropy(out[..., :nc].flatten(0, 1), color[idx].flatten())
                + F.cross_entropy(out[..., nc:].flatten(0, 1), shape[idx].flatten()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    color_t, shape_t = targets(scenes_test)
    with torch.no_grad():
        out = probe(x_test)
    full = color_t < len(COLORS)
    return {"colour": float((out[..., :nc].argmax(-1) == color_t)[full].float().mean()),
            "shape": float((out[..., nc:].argmax(-1) == shape_t)[full].float().mean()),
            "empty": float((out[..., :nc].argmax(-1) == len(COLORS))[~full].float().mean())}


class QuestionReader(nn.Module):
    """mmdlm decoder layers over [projected slots (+ slot embeddings), question words]; classifies the answer."""

    def __init__(self, width: int, slots: int, words: int, answers: int, reader: str, layers: int, hidden: int,
                 causal: bool) -> None:
        super().__init__()
        config = MMDLMConfig(vocab_size=words, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 32), intermediate_size=4 * hidden, is_causal=causal)
        self.body = MMDLMModel(config)
        self.projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.slot_embed = nn.Parameter(torch.randn(slots, hidden) * 0.02) if reader == "slot" else None
        self.head = nn.Linear(hidden, answers)

    def forward(self, feats: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        slots = self.projector(feats)
        if self.slot_embed is not None:
            slots = slots + self.slot_embed
        x = torch.cat([slots, self.body.embed_tokens(words)], 1)
        last = slots.shape[1] + lengths - 1
        mask = torch.arange(x.shape[1])[None] <= last[:, None]
        hidden, _ = self.body(inputs_embeds=x, attention_mask=mask.long())
        return self.head(hidden[torch.arange(len(x)), last])


def question_rows(scenes: list, vocab: dict[str, int], answers: dict[str, int]) -> list[tuple]:
    """(scene index, word ids + <sep>, answer id, question type, random-object score) per question."""
    rows = []
    for i, (objects, qas) in enumerate(scenes):
        for qa in qas:
            ids = [vocab[w] for w in qa.question.rstrip("?").split()] + [vocab["<sep>"]]
            chance = random_object_chance(objects, qa)
            chance = float("nan") if chance is None else chance
            rows.append((i, ids, answers[qa.answer], qa.qtype, chance))
    return rows


def train_reader(train: tuple, test: tuple, reader: str, steps: int, batch_size: int, layers: int, hidden: int,
                 causal: bool, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train one question reader on the frozen training features; accuracy per question type on the test scenes."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    (x, scenes), (x_test, scenes_test) = train, test
    all_qas = [qa for _, qas in scenes + scenes_test for qa in qas]
    words = sorted({w for qa in all_qas for w in qa.question.rstrip("?").split()}) + ["<sep>", "<pad>"]
    vocab = {w: i for i, w in enumerate(words)}
    answers = {a: i for i, a in enumerate(sorted({qa.answer for qa in all_qas}))}
    rows, rows_test = question_rows(scenes, vocab, answers), question_rows(scenes_test, vocab, answers)
    model = QuestionReader(x.shape[-1], x.shape[1], len(words), len(answers), reader, layers, hidden, causal)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)

    def batch(feats, rs):
        width = max(len(r[1]) for r in rs)
        ids = torch.tensor([r[1] + [vocab["<pad>"]] * (width - len(r[1])) for r in rs])
        return feats[[r[0] for r in rs]], ids, torch.tensor([len(r[1]) for r in rs]), torch.tensor([r[2] for r in rs])

    start = time.time()
    bar = tqdm(range(steps), desc=f"reader {reader}", unit="step")
    for _ in bar:
        feats, ids, lengths, y = batch(x, rng.sample(rows, batch_size))
        loss = F.cross_entropy(model(feats, ids, lengths), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    hits, chance = defaultdict(list), defaultdict(list)
    with torch.no_grad():
        for k in range(0, len(rows_test), 500):
            rs = rows_test[k:k + 500]
            feats, ids, lengths, y = batch(x_test, rs)
            for r, ok in zip(rs, (model(feats, ids, lengths).argmax(-1) == y).tolist()):
                hits[r[3]].append(ok)
                chance[r[3]].append(r[4])
    return {"reader": reader, "causal": causal, "layers": layers, "hidden": hidden, "steps": steps,
            "batch_size": batch_size, "seconds": round(time.time() - start, 1), "final_train_loss": round(loss.item(), 4),
            "accuracy": {t: sum(v) / len(v) for t, v in sorted(hits.items())},
            "random_object": {t: sum(v) / len(v) for t, v in sorted(chance.items()) if v[0] == v[0]},
            "questions": {t: len(v) for t, v in sorted(hits.items())}}


def report(result: dict) -> str:
    """A markdown table of the probe's results."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    p = result["slot_probe"]
    lines = [f"Tower: `{result['model']}`; {result['train_scenes']} training scenes, {result['test_scenes']} test "
             f"scenes (test split, seed 0).", "",
             f"Per-slot probe (test): colour of the object in the cell {pct(p['colour'])}, shape {pct(p['shape'])}, "
             f"empty cells read as empty {pct(p['empty'])}.", "",
             "| reader | steps x batch | " + " | ".join(QUESTION_TYPES) + " | minutes |",
             "|---|---|" + "---|" * len(QUESTION_TYPES) + "---|"]
    for r in result["readers"]:
        name = f"{r['reader']} ({'causal' if r['causal'] else 'bidirectional'}, {r['layers']} x {r['hidden']})"
        cells = [pct(r["accuracy"][t]) if t in r["accuracy"] else "-" for t in QUESTION_TYPES]
        lines.append(f"| {name} | {r['steps']} x {r['batch_size']} | " + " | ".join(cells)
                     + f" | {r['seconds'] / 60:.1f} |")
    chance = result["readers"][0]["random_object"]
    lines.append("| a random object's answer | | " + " | ".join(
        pct(chance[t]) if t in chance else "" for t in QUESTION_TYPES) + " | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_TOWER), help="a saved mmdlm model with a vision tower "
                    "(default: the tower shapes-tiny was trained on, round2-prefix/vision_pretrain)")
    ap.add_argument("--train-scenes", type=int, default=12000)
    ap.add_argument("--test-scenes", type=int, default=1000)
    ap.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--bidirectional", action="store_true", help="full attention instead of causal")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="folder for probe.json and probe.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = encode_scenes(args.model, "train", args.train_scenes)
    test = encode_scenes(args.model, "test", args.test_scenes)
    model = Path(args.model).resolve()
    result = {"model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else args.model,
              "train_scenes": args.train_scenes, "test_scenes": args.test_scenes, "slot_probe": slot_probe(train, test),
              "readers": [train_reader(train, test, r, args.steps, args.batch_size, args.layers, args.hidden,
                                       not args.bidirectional) for r in args.readers]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "probe.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
