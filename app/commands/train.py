"""`wyckoff-lab train`: train a generator on a dataset (resumable; weights exported as safetensors + JSON)."""

from __future__ import annotations

from wyckoff_lab.app.cli import positive_float


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a generative model")
    sub = parser.add_subparsers(dest="model_name", metavar="MODEL", required=True)
    wt = sub.add_parser("wyckoff-transformer", help="the Wyckoff transformer (Matra-Genoa)")
    wt.add_argument("--dataset", default="mp_20")
    wt.add_argument("--extra-data", default=None, choices=["mp_36k"],
                    help="add this set's rows to training (MP-20 held-out ids and systems left out) and label "
                         "stability from the hull of both")
    wt.add_argument("--out", default="runs/wyckoff-transformer", help="run folder (checkpoint.pt, best/)")
    wt.add_argument("--epochs", type=int, default=60)
    wt.add_argument("--batch-size", type=int, default=128)
    wt.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate, a finite number > 0")
    wt.add_argument("--d-model", type=int, default=192)
    wt.add_argument("--layers", type=int, default=4)
    wt.add_argument("--heads", type=int, default=6)
    wt.add_argument("--head", choices=["mixture", "mse"], default="mixture", help="continuous head")
    wt.add_argument("--max-minutes", type=positive_float, default=None, help="stop after this much wall time")
    wt.add_argument("--device", default=None)
    wt.add_argument("--seed", type=int, default=0)
    wt.add_argument("--install", action="store_true", help="copy the best weights into assets/models when done")
    wt.add_argument("--embeddings", default=None, help="also write the learned embeddings (npz) here")
    wt.add_argument("--json", action="store_true")
    wt.set_defaults(func=_train_wyckoff_transformer)


def _train_wyckoff_transformer(args) -> int:
    import shutil

    from wyckoff_lab.app.cli import emit
    from wyckoff_lab.core.generators.wyckoff_transformer import default_weights_dir
    from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformerConfig
    from wyckoff_lab.core.generators.wyckoff_transformer.train import TrainConfig, train

    config = TrainConfig(dataset=args.dataset, extra_data=args.extra_data, out_dir=args.out, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, max_minutes=args.max_minutes, device=args.device,
                         seed=args.seed,
                         model=WyckoffTransformerConfig(d_model=args.d_model, n_layers=args.layers,
                                                        n_heads=args.heads, head=args.head))
    result = train(config, progress=not args.json)
    if args.install:
        target = default_weights_dir()
        target.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(f"{args.out}/best/{name}", target / name)
        result["installed"] = str(target)
    if args.embeddings:
        from wyckoff_lab.core.generators.wyckoff_transformer import export_embeddings, load_model

        model, _ = load_model(f"{args.out}/best", device="cpu")
        export_embeddings(model, args.embeddings)
        result["embeddings"] = args.embeddings
    emit(result, args.json, f"trained {result['epochs_done']} epochs, {result['steps']} steps; "
                            f"best validation loss {result['best_val_loss']:.4f}")
    return 0
