"""`facedist gallery ...` and `facedist train --task embedding`: flags and handlers, registered by
facedist.cli (add_parser) so the gallery's command line lives beside its code.

    facedist gallery enroll --models M --gallery URI --person NAME IMAGE...   one person's photos
    facedist gallery enroll --models M --gallery URI MANIFEST                  many people (Ray Data)
    facedist gallery delete --gallery URI --person NAME
    facedist gallery identify --models M --gallery URI IMAGE...                photos of one unknown person
    facedist gallery verify --models M --a IMAGE... --b IMAGE...               the same person or not
    facedist gallery list --gallery URI
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from facedist import SettingsError, storage


def add_parser(subparsers, add_extractor_arguments, extract_config_from_args,
               formatter_class=argparse.HelpFormatter, parents=()) -> argparse.ArgumentParser:
    """The `gallery` command and its actions, on the CLI's subparsers. The CLI hands in its
    extractor flags and their reading (add_extractor_arguments, extract_config_from_args), so
    this module does not import facedist.cli (no import cycle)."""
    parser = subparsers.add_parser("gallery", help="enrol people without retraining; identify and verify against them",
                                   formatter_class=formatter_class, parents=list(parents))
    actions = parser.add_subparsers(dest="action", required=True)

    def action(name: str, help: str, models: bool, gallery: bool, extract: bool) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help, formatter_class=formatter_class)
        if models:
            p.add_argument("--models", required=True,
                           help="the training output holding embedding/ (`facedist train --task embedding`)")
        if gallery:
            p.add_argument("--gallery", required=True, help="the gallery: local folder or s3:// prefix")
        if extract:
            add_extractor_arguments(p)
            p.set_defaults(extract_config=extract_config_from_args)
        p.add_argument("--endpoint", default=None,
                       help="S3 endpoint URL for MinIO/Ceph-style stores (default: AWS_ENDPOINT_URL)")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        return p

    enroll = action("enroll", "add one person's photos (--person), or many people from a manifest or table",
                    models=True, gallery=True, extract=True)
    enroll.add_argument("--person", default=None, help="the person the IMAGES show")
    enroll.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="with --person: image files or s3:// objects; without: one CSV/Parquet manifest "
                             "(path, subject) or a coefficients table with a subject column")
    enroll.add_argument("--coefficients", default=None, metavar="URI",
                        help="a manifest's images are extracted here first (default: GALLERY-coefficients beside "
                             "the gallery; `gallery delete` does not touch it)")
    enroll.add_argument("--people-per-part", type=int, default=1000,
                        help="bulk: whole enrolments per gallery part")
    enroll.add_argument("--actors", type=int, default=2, help="bulk: extraction and embedding actors")
    enroll.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    enroll.set_defaults(func=cmd_enroll)

    delete = action("delete", "remove every photo of a person (says what it removed)",
                    models=False, gallery=True, extract=False)
    delete.add_argument("--person", required=True, help="the person to remove")
    delete.set_defaults(func=cmd_delete)

    identify = action("identify", "photos of one unknown person -> the best matches, 'unknown' below the "
                      "threshold", models=True, gallery=True, extract=True)
    identify.add_argument("images", nargs="+", metavar="IMAGE")
    identify.add_argument("--top-k", type=int, default=5)
    identify.set_defaults(func=cmd_identify)

    verify = action("verify", "two sets of photos -> the same person or not", models=True, gallery=False,
                    extract=True)
    verify.add_argument("--a", nargs="+", required=True, metavar="IMAGE", help="photos of the first person")
    verify.add_argument("--b", nargs="+", required=True, metavar="IMAGE", help="photos of the second person")
    verify.set_defaults(func=cmd_verify)

    listing = action("list", "the people enrolled and their photo counts", models=False, gallery=True,
                     extract=False)
    listing.set_defaults(func=cmd_list)
    return parser


def _options(args) -> storage.S3Options:
    env = storage.S3Options.from_env()
    return storage.S3Options(endpoint_url=getattr(args, "endpoint", None) or env.endpoint_url, region=env.region)


def _extract(args, paths: list[str]) -> list[dict]:
    """Single-process extraction of a few images (the extractor flags' settings)."""
    from facedist.extraction.rows import decode_row, extract_rows, read_row

    config = args.extract_config(args)
    extractor = config.build_extractor()
    rows = [decode_row(read_row({"path": p}, _options(args)), config.max_side) for p in paths]
    finished, _ = extract_rows(rows, extractor)
    return finished


def _embed(model, rows: list[dict], what: str) -> tuple[np.ndarray, list[str]]:
    """The usable rows' embeddings and their paths; the others are said and left out."""
    embeddings, have, missing = model.embed_rows(rows)
    for i, why in missing.items():
        print(f"  {rows[i].get('path')}: left out ({why})")
    if not have:
        raise SettingsError(f"{what}: no usable face in any of the {len(rows)} image(s)")
    return embeddings, [rows[i].get("path") for i in have]


def _print(args, body: dict, text: str) -> None:
    print(json.dumps(body, indent=2) if args.json else text)


def cmd_enroll(args) -> int:
    from facedist.gallery.embedding import EmbeddingModel
    from facedist.gallery.store import Gallery

    model = EmbeddingModel.load(args.models)
    gallery = Gallery(args.gallery, _options(args))
    if args.person is None:
        if len(args.inputs) != 1:
            raise SettingsError("without --person, give one manifest or coefficients table")
        from facedist.gallery.ray_enroll import BulkEnrolConfig, run_bulk_enrolment

        summary = run_bulk_enrolment(args.inputs[0], gallery, model, BulkEnrolConfig(
            coefficients=args.coefficients, people_per_part=args.people_per_part, actors=args.actors,
            extract=args.extract_config(args)), address=args.address)
        _print(args, summary, f"enrolled {summary['people']} people ({summary['photos']} photos) into "
                              f"{gallery.uri} in {summary['parts']} parts; {summary['left_out']} photos left out")
        return 0
    embeddings, photos = _embed(model, _extract(args, args.inputs), args.person)
    written = gallery.enroll(args.person, embeddings, photos, model.version, model.kind)
    _print(args, written, f"enrolled {args.person}: {written['photos']} photo(s) -> {written['part']}")
    return 0


def cmd_delete(args) -> int:
    from facedist.gallery.store import Gallery

    removed = Gallery(args.gallery, _options(args)).delete(args.person)
    _print(args, removed, f"removed {args.person}: {removed['photos']} photo(s) of {removed['enrolments']} "
                          f"enrolment(s); {len(removed['parts_removed'])} part(s) removed, "
                          f"{len(removed['parts_written'])} written again without them"
           if removed["photos"] else f"{args.person} is not in {args.gallery}: nothing removed")
    return 0 if removed["photos"] else 1


def cmd_identify(args) -> int:
    from facedist.gallery.embedding import EmbeddingModel
    from facedist.gallery.search import identify
    from facedist.gallery.store import Gallery, GalleryReader

    model = EmbeddingModel.load(args.models)
    reader = GalleryReader(Gallery(args.gallery, _options(args)), model.version)
    reader.refresh()
    embeddings, _ = _embed(model, _extract(args, args.images), "identify")
    answer = identify(reader.loaded.index, model, embeddings, args.top_k)
    ranked = ", ".join(f"{m['person']} {m['score']:.3f}" for m in answer["top_k"])
    _print(args, answer, f"{answer['identity']} (threshold {model.threshold:.3f}; best: {ranked or 'empty gallery'})")
    return 0


def cmd_verify(args) -> int:
    from facedist.gallery.embedding import EmbeddingModel
    from facedist.gallery.search import verify

    model = EmbeddingModel.load(args.models)
    a, _ = _embed(model, _extract(args, args.a), "--a")
    b, _ = _embed(model, _extract(args, args.b), "--b")
    answer = verify(model, a, b)
    _print(args, answer, f"{'same person' if answer['same'] else 'different people'}: score {answer['score']:.3f} "
                         f"(threshold {model.threshold:.3f})")
    return 0


def cmd_list(args) -> int:
    from facedist.gallery.store import Gallery

    loaded = Gallery(args.gallery, _options(args)).load()
    body = {"people": len(loaded.photos), "photos": int(sum(loaded.photos.values())), "parts": loaded.parts,
            "by_person": loaded.photos}
    _print(args, body, "\n".join([f"{len(loaded.photos)} people, {body['photos']} photos in {loaded.parts} parts"]
                                 + [f"  {p}: {n}" for p, n in sorted(loaded.photos.items())]))
    return 0


def serve_uris(models: str | None, embedding: str | None) -> tuple[str | None, str | None]:
    """`facedist serve --gallery`: (models for /v1/predict, the embedding bundle). A models folder
    with no classifier bundle (only embedding/) serves the gallery alone."""
    from facedist.gallery.embedding import EMBEDDING_TASK
    from facedist.recognition import RECOGNIZER_TASKS
    from facedist.training.bundle import BUNDLE_FILE

    if models is None:
        return None, embedding
    embedding = embedding or storage.join(models, EMBEDDING_TASK)
    classifiers = any(storage.exists(storage.join(models, task, BUNDLE_FILE)) for task in RECOGNIZER_TASKS)
    return (models if classifiers else None), embedding


# ---- facedist train --task embedding ------------------------------------------------------------

def train_embedding(args) -> int:
    """`facedist train --task embedding`: the embedding bundle into OUTPUT/embedding. --inputs
    picks the groups (default: the preset's), --input-norm within_class learns the within-person
    map (default: the preset's; standard: none); the threshold is set at 1% FAR on the table's
    pairs."""
    from facedist.gallery.embedding import EMBEDDING_PRESET, EMBEDDING_TASK, fit_embedding
    from facedist.training.data import load_data

    data = load_data(args.data)
    keep = np.flatnonzero([s is not None for s in data.subject])
    if len(set(map(str, data.subject[keep]))) < 2:
        raise SettingsError(f"{args.data}: the embedding's threshold needs photos of at least 2 people (subject)")
    inputs = tuple(args.inputs) if args.inputs else EMBEDDING_PRESET["inputs"]
    whiten = EMBEDDING_PRESET["whiten"] if args.input_norm is None else args.input_norm.startswith("within_class")
    model = fit_embedding(data, inputs, whiten, rows=keep)
    target = model.save(storage.join(storage.absolute(args.output), EMBEDDING_TASK))
    metrics = model.metrics
    print(f"trained embedding ({model.kind} on {'+'.join(inputs)}, {model.dim}-d, version {model.version}): "
          f"threshold {model.threshold:.4f} at FAR {metrics['train_far']:.4f} / TAR {metrics['train_tar']:.3f} "
          f"on {metrics['train_people']} people's pairs; bundle at {target}")
    return 0
