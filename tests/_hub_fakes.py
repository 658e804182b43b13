"""Offline test doubles for the Hugging Face Hub: a fake HfApi at the network boundary and a hand-built HF cache.

Every call the fake receives is bound against the real `huggingface_hub.HfApi` method signature, so the code under
test must call the real API correctly. The fake keeps a repository as commits of whole file trees and applies a
commit only once all its files were read, as the Hub does.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, RepoUrl
from huggingface_hub import constants as hf_constants

import timm_reduce


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """A 4-block ViT small enough for fast tests (32x32 input, 5 classes)."""
    torch.manual_seed(seed)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                              num_classes=5)
    return model.eval()


@dataclass(frozen=True)
class Example:
    """How to reduce the tiny ViT with one strategy.

    Attributes:
        options: options for `timm_reduce.reduce`, or None when `build` makes the model (strategies needing data).
        build: `build(model) -> reduced model`, e.g. `compress` with a tiny calibration set.
        dense: the result has a plain timm form (`materialize` / `dense=True`); False means it must refuse clearly.
    """

    options: dict[str, Any] | None = None
    build: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    dense: bool = True


# Examples per registered strategy, keyed by example id. A newly registered strategy makes the tests fail until it
# is listed here (no skipping): add at least one example so Hub round trips, dense copies and exports cover it.
STRATEGY_EXAMPLES: dict[str, dict[str, Example]] = {
    'fips': {'fips': Example({'budget': 0.25, 'group_size': 2, 'sparsifier': 'static'})},
    'grouped': {'grouped': Example({'group_size': 2})},
    'morphreuse': {'morphreuse': Example({}),
                   'morphreuse-core': Example({'variant': 'core', 'core_dim': 8}, dense=False)},
    'shallow': {'shallow': Example({'keep': 0.5})},
    'thin': {'thin': Example({'mlp_ratio': 2.0})},
}


def example_ids() -> list[str]:
    """One id per example of every registered strategy (a strategy without examples gives its bare name)."""
    return [eid for name in timm_reduce.list_strategies() for eid in STRATEGY_EXAMPLES.get(name, {name: None})]


def get_example(example_id: str) -> tuple[str, Example]:
    for name, examples in STRATEGY_EXAMPLES.items():
        if example_id in examples:
            return name, examples[example_id]
    pytest.fail(f'Strategy {example_id!r} is registered but has no entry in tests/_hub_fakes.STRATEGY_EXAMPLES: '
                'add an example so Hub round trips, dense copies and exports cover it.')


def reduced_example(example_id: str, seed: int = 0) -> torch.nn.Module:
    strategy, example = get_example(example_id)
    model = tiny_vit(seed)
    if example.build is not None:
        return example.build(model).eval()
    return timm_reduce.reduce(model, strategy, **example.options).eval()


def sample_input(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))



class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No sockets, no ambient Hub token, an empty HF home: nothing can reach a real Hub."""

    def refuse(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        raise NetworkBlocked(f'test tried to open a network connection to {args}')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket.socket, 'connect_ex', refuse)
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE', 'HF_HUB_OFFLINE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'hf_home' / 'token'))
    monkeypatch.setattr(hf_constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'hf_home' / 'stored_tokens'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_home' / 'hub'))


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class FakeRepo:
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {'main': []})
    pull_requests: list[Commit] = field(default_factory=list)


def _bind(method: str, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
    """Check a call against the real HfApi signature (TypeError if the code under test calls it wrongly)."""
    bound = inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound


def _read(op: CommitOperationAdd) -> bytes:
    src = op.path_or_fileobj
    if isinstance(src, (str, os.PathLike)):
        return Path(src).read_bytes()
    if isinstance(src, bytes):
        return src
    assert isinstance(src, io.BufferedIOBase)
    return src.read()


class FakeHub:
    """The Hub's state and the calls it received. `api` stands in for the `HfApi` class."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_commit: BaseException | None = None  # raised mid-upload, after the first file was read
        self.fail_create_repo: BaseException | None = None

    def api(self, *args: Any, **kwargs: Any) -> 'FakeHfApi':
        bound = inspect.signature(HfApi.__init__).bind(None, *args, **kwargs)
        self.calls.append(('HfApi', {k: v for k, v in bound.arguments.items() if k != 'self'}))
        return FakeHfApi(self, bound.arguments.get('token'))

    def tree(self, repo_id: str, revision: str = 'main') -> dict[str, bytes]:
        commits = self.repos[repo_id].branches[revision]
        return dict(commits[-1].files) if commits else {}

    def write_folder(self, repo_id: str, dest: Path, revision: str = 'main') -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.tree(repo_id, revision).items():
            (dest / name).write_bytes(data)
        return dest

    def write_cache(self, cache_dir: Path, repo_id: str) -> Path:
        """Lay out `repo_id` as huggingface_hub's cache does: blobs, snapshots/<commit>/ links, refs/<branch>."""
        storage = cache_dir / ('models--' + repo_id.replace('/', '--'))
        for branch, commits in self.repos[repo_id].branches.items():
            if not commits:
                continue
            commit = commits[-1]
            (storage / 'refs').mkdir(parents=True, exist_ok=True)
            (storage / 'refs' / branch).write_text(commit.oid)
            snapshot = storage / 'snapshots' / commit.oid
            snapshot.mkdir(parents=True, exist_ok=True)
            (storage / 'blobs').mkdir(exist_ok=True)
            for name, data in commit.files.items():
                blob = storage / 'blobs' / hashlib.sha256(data).hexdigest()
                blob.write_bytes(data)
                link = snapshot / name
                if not link.exists():
                    link.symlink_to(os.path.relpath(blob, snapshot))
        return storage


class FakeHfApi:
    """The HfApi methods timm_reduce may use; any other attribute does not exist (AttributeError)."""

    def __init__(self, hub: FakeHub, token: Any) -> None:
        self.hub = hub
        self.token = token

    def create_repo(self, *args: Any, **kwargs: Any) -> RepoUrl:
        bound = _bind('create_repo', *args, **kwargs)
        self.hub.calls.append(('create_repo', dict(bound.arguments)))
        if self.hub.fail_create_repo is not None:
            raise self.hub.fail_create_repo
        repo_id = bound.arguments['repo_id']
        if repo_id in self.hub.repos and not bound.arguments['exist_ok']:
            raise AssertionError('create_repo without exist_ok on an existing repo')
        self.hub.repos.setdefault(repo_id, FakeRepo(private=bool(bound.arguments['private'])))
        return RepoUrl(f'https://huggingface.co/{repo_id}')

    def create_branch(self, *args: Any, **kwargs: Any) -> None:
        bound = _bind('create_branch', *args, **kwargs)
        self.hub.calls.append(('create_branch', dict(bound.arguments)))
        repo = self.hub.repos[bound.arguments['repo_id']]
        branch = bound.arguments['branch']
        if branch in repo.branches and not bound.arguments['exist_ok']:
            raise AssertionError('create_branch without exist_ok on an existing branch')
        repo.branches.setdefault(branch, list(repo.branches['main'][-1:]))

    def create_commit(self, *args: Any, **kwargs: Any) -> CommitInfo:
        bound = _bind('create_commit', *args, **kwargs)
        arguments = dict(bound.arguments)
        operations = list(arguments['operations'])
        arguments['operations'] = [op.path_in_repo for op in operations]
        self.hub.calls.append(('create_commit', arguments))
        repo_id, revision = arguments['repo_id'], arguments['revision'] or 'main'
        repo = self.hub.repos[repo_id]  # KeyError: committing to a repo that was never created
        if revision not in repo.branches:
            raise AssertionError(f'commit to missing branch {revision!r}')
        files = {}
        for op in operations:
            assert isinstance(op, CommitOperationAdd), op
            files[op.path_in_repo] = _read(op)
            if self.hub.fail_commit is not None:  # the connection drops mid-upload: the commit never lands
                raise self.hub.fail_commit
        tree = {**self.hub.tree(repo_id, revision), **files}
        oid = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in tree.items())).encode()
                           + str(len(self.hub.calls)).encode()).hexdigest()
        commit = Commit(oid, arguments['commit_message'], tree)
        if arguments['create_pr']:
            repo.pull_requests.append(commit)
            pr_url = f'https://huggingface.co/{repo_id}/discussions/{len(repo.pull_requests)}'
        else:
            repo.branches[revision].append(commit)
            pr_url = None
        return CommitInfo(commit_url=f'https://huggingface.co/{repo_id}/commit/{oid}',
                          commit_message=arguments['commit_message'], commit_description='', oid=oid, pr_url=pr_url)


@pytest.fixture
def fake_hub(offline: None, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """A FakeHub patched in where timm_reduce.persistence.hub creates its HfApi, with HF_TOKEN set."""
    hub = FakeHub()
    monkeypatch.setattr(timm_reduce.persistence.hub, 'HfApi', hub.api)
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    return hub
