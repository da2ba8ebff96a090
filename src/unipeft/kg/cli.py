"""`unipeft kg ACTION`: data, train-link, calibrate, eval and answer for CQD / CQD^A.

  unipeft kg data --dataset umls [--queries]
  unipeft kg train-link --dataset umls --out runs/umls-link
  unipeft kg calibrate --predictor runs/umls-link --out runs/umls-cqda [--fraction 0.01] [--structures 1p,2p,2i,2in]
  unipeft kg eval --predictor runs/umls-link [--adapter runs/umls-cqda] [--tnorm prod|min]
  unipeft kg answer --predictor runs/umls-link [--adapter ...] --structure 2p --query "SLOT,SLOT,SLOT"
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Listed here (kept equal to the library's tuples by a test) so that building the parser imports nothing heavy.
DATASET_NAMES = ("umls", "kinships", "nations")
STRUCTURE_NAMES = ("1p", "2p", "3p", "2i", "3i", "pi", "ip", "2u", "up", "2in", "3in", "inp", "pin", "pni")
TRAIN_DEFAULT = "1p,2p,3p,2i,3i,2in,3in,inp,pin,pni"
CALIBRATION_FILE = "kg_calibration.json"


def _query_options(p: argparse.ArgumentParser, splits: tuple[str, ...]) -> None:
    defaults = {"train": 2000, "valid": 100, "test": 300}
    for split in splits:
        p.add_argument(f"--n-{split}", type=int, default=defaults[split],
                       help=f"{split} queries generated per structure (default: {defaults[split]})")
    p.add_argument("--query-seed", type=int, default=0, help="seed of query generation (default: 0)")


def _cqd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tnorm", default=None, help="t-norm: prod (product) or min (Goedel) (default: prod, or the "
                                                 "calibrator's own)")
    p.add_argument("--beam", type=int, default=None, help="beam width per variable (default: every entity)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-actions of the `kg` verb."""
    sub = parser.add_subparsers(dest="kg_action", metavar="ACTION")
    p = sub.add_parser("data", help="entity/relation/triple counts of a dataset (and generated-query statistics)")
    p.add_argument("--dataset", default="umls", help=f"one of {', '.join(DATASET_NAMES)} (default: umls)")
    p.add_argument("--queries", action="store_true", help="also generate queries and print their statistics")
    _query_options(p, ("train", "valid", "test"))

    p = sub.add_parser("train-link", help="train the ComplEx-N3 link predictor; prints filtered MRR/Hits@k")
    p.add_argument("--dataset", default="umls", help=f"one of {', '.join(DATASET_NAMES)} (default: umls)")
    p.add_argument("--out", type=Path, required=True, help="folder for predictor.safetensors/.json, metrics.json")
    p.add_argument("--rank", type=int, default=200, help="ComplEx rank (default: 200)")
    p.add_argument("--epochs", type=int, default=60, help="training epochs (default: 60)")
    p.add_argument("--lr", type=float, default=0.1, help="Adagrad learning rate (default: 0.1)")
    p.add_argument("--reg", type=float, default=5e-3, help="N3 regularisation weight (default: 5e-3)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")

    p = sub.add_parser("calibrate", help="train a CQD^A calibrator on complex training queries (predictor frozen)")
    p.add_argument("--predictor", type=Path, required=True, help="folder written by train-link")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write (unipeft/PEFT layout)")
    p.add_argument("--structures", default=TRAIN_DEFAULT, help=f"training structures (default: {TRAIN_DEFAULT})")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the training queries used (default: 1.0)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--lr", type=float, default=0.003, help="Adam learning rate (default: 0.003)")
    p.add_argument("--batch-size", type=int, default=64, help="queries per batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of sub-sampling and batching (default: 0)")
    _cqd_options(p)
    _query_options(p, ("train", "valid"))

    p = sub.add_parser("eval", help="MRR and Hits@1/3/10 on hard answers per structure, CQD or CQD^A")
    p.add_argument("--predictor", type=Path, required=True, help="folder written by train-link")
    p.add_argument("--adapter", type=Path, help="calibrator folder written by calibrate (omit for plain CQD)")
    p.add_argument("--structures", default=",".join(STRUCTURE_NAMES), help="structures to evaluate (default: all)")
    p.add_argument("--split", default="test", help="valid or test (default: test)")
    p.add_argument("--json", type=Path, help="also write the metrics to this file")
    _cqd_options(p)
    _query_options(p, ("test",))

    p = sub.add_parser("answer", help="rank the answers of one query given by entity/relation names")
    p.add_argument("--predictor", type=Path, required=True, help="folder written by train-link")
    p.add_argument("--adapter", type=Path, help="calibrator folder (omit for plain CQD)")
    p.add_argument("--structure", required=True, help=f"query structure: {', '.join(STRUCTURE_NAMES)}")
    p.add_argument("--query", required=True, help="comma-separated slots: entity names and relation names "
                                                  "(a relation name + '^-1' for its inverse)")
    p.add_argument("--top", type=int, default=10, help="answers to print (default: 10)")
    _cqd_options(p)


def _structures(text: str) -> list[str]:
    from .structures import check_structures
    return check_structures([s.strip() for s in text.split(",") if s.strip()])


def _positive(args: argparse.Namespace, *names: str) -> None:
    from ..core.errors import ConfigError
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")


def _load(args: argparse.Namespace):
    """(dataset, predictor or calibrated predictor, calibration record or None)."""
    from ..core.errors import ConfigError
    from .datasets import load_dataset
    from .link import load_link_predictor
    predictor = load_link_predictor(args.predictor)
    meta = json.loads((args.predictor / "predictor.json").read_text()).get("meta", {})
    if "dataset" not in meta:
        raise ConfigError(f"{args.predictor}/predictor.json has no meta.dataset; write it with `unipeft kg train-link`")
    data = load_dataset(meta["dataset"])
    record = None
    if getattr(args, "adapter", None) is not None:
        from ..core.model import AdaptedModel
        predictor = AdaptedModel.from_pretrained(predictor, args.adapter)
        path = args.adapter / CALIBRATION_FILE
        record = json.loads(path.read_text()) if path.is_file() else {}
    return data, predictor, record


def _cqd_config(args: argparse.Namespace, record: dict | None):
    from .cqd import CQDConfig
    trained = (record or {}).get("config", {})
    return CQDConfig(tnorm=args.tnorm or trained.get("tnorm", "prod"), beam=args.beam)


def _print_table(result: dict) -> None:
    cols = ("mrr", "hits@1", "hits@3", "hits@10", "queries")
    print(f"{'structure':<10}" + "".join(f"{c:>9}" for c in cols))
    for name, row in result["per_structure"].items():
        print(f"{name:<10}" + "".join(f"{row[c]:>9}" for c in cols))
    for key in ("avg_mrr", "avg_mrr_positive", "avg_mrr_negation"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:.4f}")


def _run_data(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    from .querygen import generate_queries, query_stats
    data = load_dataset(args.dataset)
    print(json.dumps(data.summary()))
    if args.queries:
        _positive(args, "n_train", "n_valid", "n_test")
        qs = generate_queries(data, n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test,
                              seed=args.query_seed)
        for split, by_s in query_stats(qs).items():
            for s, row in by_s.items():
                print(f"{split:<6} {s:<4} queries {row['queries']:>5}  answers {row['answers']:>6}  hard {row['hard']:>6}")
    return 0


def _run_train_link(args: argparse.Namespace) -> int:
    from .datasets import load_dataset
    from .link import LinkConfig, save_link_predictor, train_and_report
    cfg = LinkConfig(rank=args.rank, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, reg=args.reg,
                     seed=args.seed)
    data = load_dataset(args.dataset)
    model, report = train_and_report(data, cfg, log=print)
    save_link_predictor(model, args.out, meta={"dataset": data.name})
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    t = report["test"]
    print(f"{data.name} test (filtered, both directions): MRR {t['mrr']:.4f}  Hits@1 {t['hits@1']:.4f}  "
          f"Hits@3 {t['hits@3']:.4f}  Hits@10 {t['hits@10']:.4f}  -> {args.out}")
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import CalibrationConfig, calibrated_copy, train_calibrator
    from .querygen import generate_split
    _positive(args, "n_train", "n_valid", "beam")
    structures = _structures(args.structures)
    cfg = CalibrationConfig(structures=structures, fraction=args.fraction, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, tnorm=args.tnorm or "prod", beam=args.beam, seed=args.seed)
    data, predictor, _ = _load(args)
    train = {s: generate_split(data, "train", s, args.n_train, args.query_seed) for s in structures}
    valid = {s: generate_split(data, "valid", s, args.n_valid, args.query_seed) for s in structures}
    model = calibrated_copy(predictor)
    report = train_calibrator(model, train, data.n_entities, cfg, valid=valid)
    model.save_pretrained(args.out)
    record = {"dataset": data.name, "predictor": str(args.predictor), "query_seed": args.query_seed,
              "n_train": args.n_train, "n_valid": args.n_valid, **report}
    (args.out / CALIBRATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"calibrator: {report['adapter_parameters']} parameters = {100 * report['parameter_fraction']:.3f}% of "
          f"the predictor's {report['predictor_parameters']}; valid avg MRR {report['history'][0]['valid_avg_mrr']:.4f} "
          f"(CQD) -> {report['best_valid_avg_mrr']:.4f} (step {report['best_step']}) -> {args.out}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from .evaluate import evaluate_queries
    from .querygen import generate_split
    if args.split not in ("valid", "test"):
        raise ConfigError(f"--split: expected valid or test, got {args.split!r}")
    _positive(args, "n_test", "beam")
    structures = _structures(args.structures)
    data, model, record = _load(args)
    cfg = _cqd_config(args, record)
    queries = {s: generate_split(data, args.split, s, args.n_test, args.query_seed) for s in structures}
    result = evaluate_queries(model, queries, data.n_entities, cfg)
    result = {"dataset": data.name, "method": "CQD^A" if args.adapter else "CQD", "tnorm": cfg.tnorm, **result}
    print(f"{result['method']} on {data.name} {args.split} ({cfg.tnorm} t-norm):")
    _print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _run_answer(args: argparse.Namespace) -> int:
    import torch

    from ..core.errors import ConfigError
    from .cqd import answer_queries
    from .structures import answers, slot_kinds
    _positive(args, "top", "beam")
    structure = _structures(args.structure)[0]
    data, model, record = _load(args)
    kinds = slot_kinds(structure)
    slots = [s.strip() for s in args.query.split(",")]
    if len(slots) != len(kinds):
        raise ConfigError(f"--query: a {structure} query has {len(kinds)} slots ({','.join(kinds)}: e=entity, "
                          f"r=relation), got {len(slots)}")
    ents = {e: i for i, e in enumerate(data.entities)}
    rels = {r: i for i, r in enumerate(data.relations)}
    rels.update({f"{r}^-1": i + data.n_relations for r, i in list(rels.items())})
    row = []
    for pos, (kind, name) in enumerate(zip(kinds, slots)):
        table = ents if kind == "e" else rels
        if name not in table:
            what = "entity" if kind == "e" else "relation"
            raise ConfigError(f"--query slot {pos + 1}: unknown {what} {name!r} in {data.name} "
                              f"(e.g. {', '.join(sorted(table)[:3])})")
        row.append(table[name])
    q = torch.tensor([row])
    with torch.no_grad():
        truth = answer_queries(model, structure, q, data.n_entities, _cqd_config(args, record))[0]
    known = answers(structure, q, data.graph("train"))[0]
    top = truth.topk(min(args.top, data.n_entities))
    for rank, (value, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        mark = "  (answer in the training graph)" if known[idx] else ""
        print(f"{rank:>3}. {data.entities[idx]:<40} {value:.4f}{mark}")
    return 0


ACTIONS = {"data": _run_data, "train-link": _run_train_link, "calibrate": _run_calibrate, "eval": _run_eval,
           "answer": _run_answer}


def run(args: argparse.Namespace) -> int:
    """Run one kg action; bad input raises errors the top-level CLI prints as one line (exit 2)."""
    from ..core.errors import ConfigError
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not getattr(args, "kg_action", None):
        raise ConfigError(f"unipeft kg needs an action: {', '.join(ACTIONS)} (see unipeft kg --help)")
    return ACTIONS[args.kg_action](args)
