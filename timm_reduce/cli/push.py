"""`timm-reduce push DIR REPO_ID`: upload a saved model folder to the Hugging Face Hub in one commit."""
from __future__ import annotations

import argparse

__all__ = ['add_parser']


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'push', help='upload a saved model folder to the Hugging Face Hub',
        description='Upload config.json, model.safetensors and a model card (generated when the folder has none) '
                    'from DIR to the Hub model repository REPO_ID, as one commit. The folder must load first; it is '
                    'not modified. Authenticate with `hf auth login` or HF_TOKEN.')
    parser.add_argument('directory', metavar='DIR', help='folder written by save_pretrained / `timm-reduce compress`')
    parser.add_argument('repo_id', metavar='REPO_ID', help="Hub repository 'namespace/name' (created if missing)")
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--revision', default=None, help='branch to commit to (created if missing; default main)')
    parser.add_argument('--message', default=None, help='commit message (default: describes base and recipe)')
    parser.add_argument('--token', default=None, help='Hub token (default: the logged-in token or HF_TOKEN)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    parser.add_argument('--dense', action='store_true',
                        help='upload the plain timm form (shared weights expanded) that loads without timm_reduce')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..persistence.card import user_metadata
    from ..persistence.hub import check_repo_id, load_folder, push_folder, push_to_hub

    check_repo_id(args.repo_id)
    common = dict(private=args.private, revision=args.revision, commit_message=args.message, token=args.token,
                  create_pr=args.create_pr)
    if args.dense:
        model, config = load_folder(args.directory)
        if config.get('architecture') == 'timm_reduce':
            metadata = user_metadata(dict(config.get('timm_reduce') or {}))
            info = push_to_hub(model, args.repo_id, dense=True, metadata=metadata, **common)
        else:  # already a plain timm checkpoint
            info = push_folder(args.directory, args.repo_id, **common)
    else:
        info = push_folder(args.directory, args.repo_id, **common)
    print(f'pushed {args.directory} to {getattr(info, "commit_url", None) or args.repo_id}')
    return 0
