"""Our classes dropped into a project's own LightningCLI, with either Lightning package.

The project here is the test's own: a LightningModule written against one package (``L``), run
by that package's own ``LightningCLI``, not ours. Subprocess tests check the package choice with
only one package importable, and the order of imports a program may use.
"""

import json
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from lightning_sr.testing import make_tokenizer, save_tiny_generator, save_tiny_reward, tiny_llama
from torch.utils.data import DataLoader

from lightning_sr.callbacks import config_path
from lightning_sr.callbacks.online_merging import OnlineMerging
from lightning_sr.cli import main
from lightning_sr.lightning_packages import PACKAGE_ENV, Callback, LightningModule
from lightning_sr.optim import OnDARE

ROOT = Path(__file__).resolve().parents[1]
VOCAB = len(make_tokenizer())


def project_module(L, injected: bool):
    """A project's LightningModule around a tiny Llama: ``configure_optimizers`` hard-codes AdamW,
    or (``injected``) calls an ``OptimizerCallable`` argument, the LightningCLI pattern."""

    class Project(L.LightningModule):
        def __init__(self, lr: float = 1e-3):
            super().__init__()
            self.lr = lr
            self.policy = tiny_llama(seed=0).train()

        def training_step(self, batch, batch_idx):
            return self.policy(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.policy.parameters(), lr=self.lr)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader([torch.randint(4, VOCAB, (6,), generator=g) for _ in range(4)], batch_size=2)

    if not injected:
        return Project

    OptimizerCallable = L.sub("cli").OptimizerCallable

    class InjectedProject(Project):
        def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW):
            super().__init__()
            self.optimizer = optimizer

        def configure_optimizers(self):
            return self.optimizer(self.policy.parameters())

    return InjectedProject


def run_project_cli(L, model_class, tmp_path, *args):
    trainer = ("--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.logger=false",
               "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
               f"--trainer.default_root_dir={tmp_path}")
    return L.sub("cli").LightningCLI(
        model_class, run=False, save_config_callback=None, seed_everything_default=0, args=[*trainer, *args]
    )


@pytest.mark.parametrize("route", ["hard-coded AdamW, --optimizer", "injected optimizer"])
def test_ondare_with_online_merging_from_config_alone(L, tmp_path, route):
    base = save_tiny_generator(tmp_path / "base", seed=1)
    injected = route == "injected optimizer"
    optimizer = "--model.optimizer" if injected else "--optimizer"
    with pytest.warns(UserWarning, match="configure_optimizers` will be overridden") if not injected else nullcontext():
        cli = run_project_cli(
            L, project_module(L, injected), tmp_path,
            f"{optimizer}=OnDARE", f"{optimizer}.lr=1e-6", f"{optimizer}.keep_rate=0.5", f"{optimizer}.merge_weight=1e-3",
            f"--trainer.callbacks+={config_path('online_merging')}", f"--trainer.callbacks.base_model={base}",
        )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, OnlineMerging))
    assert isinstance(callback, L.Callback)
    cli.trainer.fit(cli.model)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, OnDARE) and optimizer.defaults["merge_weight"] == 1e-3
    if not injected:  # LightningCLI's --optimizer starts from OnDARE's own defaults
        assert optimizer.defaults["weight_decay"] == 0.0
    report = callback.reports[0]
    assert "policy.model.layers.0.self_attn.q_proj.weight" in report.matched and report.kept > 0
    assert optimizer.state[cli.model.policy.lm_head.weight]["step"] == 2


def test_base_model_from_a_checkpoint_of_the_same_project(L, tmp_path):
    first = run_project_cli(L, project_module(L, injected=False), tmp_path / "sft")
    first.trainer.fit(first.model)
    ckpt = tmp_path / "sft.ckpt"
    first.trainer.save_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="configure_optimizers` will be overridden"):
        cli = run_project_cli(
            L, project_module(L, injected=False), tmp_path,
            "--optimizer=OnDARE", "--optimizer.keep_rate=1.0", "--optimizer.merge_weight=0.5",
            "--trainer.callbacks+=lightning_sr.callbacks.OnlineMerging", f"--trainer.callbacks.base_model={ckpt}",
        )
    before = cli.model.policy.lm_head.weight.detach().clone()
    cli.trainer.fit(cli.model)
    state = cli.trainer.optimizers[0].state[cli.model.policy.lm_head.weight]
    tau = (before - first.model.policy.lm_head.weight.detach()).reshape(-1)  # keep_rate 1: τ̃ = τ
    torch.testing.assert_close(state["tau_val"], tau[state["tau_idx"].long()])


@pytest.mark.parametrize("paths", ["public names", "full paths"])
def test_speculative_rejection_predict_in_a_projects_cli(L, tmp_path, paths):
    generator, reward = save_tiny_generator(tmp_path / "g"), save_tiny_reward(tmp_path / "r")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["thanks", "hi you"])))
    output = tmp_path / "predictions.jsonl"
    model, data, writer = {
        "public names": ("lightning_sr.SpeculativeRejectionModule", "lightning_sr.data.PromptDataModule",
                         "lightning_sr.callbacks.JSONLPredictionWriter"),
        "full paths": ("lightning_sr.modules.generation.SpeculativeRejectionModule",
                       "lightning_sr.data.prompts.PromptDataModule",
                       "lightning_sr.callbacks.predictions.JSONLPredictionWriter"),
    }[paths]
    L.sub("cli").LightningCLI(
        args=[
            "predict", f"--model={model}", f"--model.generator={generator}",
            f"--model.reward_model={reward}", "--model.n=4", "--model.schedule=FixedSchedule",
            "--model.schedule.lengths=[2]", "--model.sampling.max_new_tokens=4",
            f"--data={data}", f"--data.path={prompts}",
            f"--trainer.callbacks+={writer}",
            f"--trainer.callbacks.output_path={output}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        ],
        seed_everything_default=0, save_config_callback=None,
    )
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == [0, 1]


def test_our_cli_runs_a_projects_module_and_resolves_short_names(L, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-sr", "fit", "--model.help", "SpeculativeRejectionModule"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0


def test_nested_help_of_an_init_argument(capsys):
    with pytest.raises(SystemExit) as done:
        main(["predict", f"--config={ROOT / 'configs' / 'predict_sr.yaml'}", "--model.sampling.help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--model.sampling.max_new_tokens" in out and "--model.sampling.temperature" in out


def test_switching_the_optimizer_class_says_which_values_it_keeps(tmp_path, caplog):
    config = ROOT / "configs" / "fit_dpo_adamw.yaml"
    with pytest.raises(SystemExit):
        main(["fit", f"--config={config}", "--model.optimizer=lightning_sr.optim.OnDARE", "--print_config"])
    assert "OnDARE keeps {'lr': 5e-06} from torch.optim.AdamW" in caplog.text


def test_callback_shortcut_names_a_shipped_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", f"--config={ROOT / 'configs' / 'fit_dpo_adamw.yaml'}", "--trainer.callbacks+=lightning_sr:memory",
              "--print_config"])
    assert "class_path: lightning_sr.callbacks.GPUMemoryProfiler" in capsys.readouterr().out
    from lightning_sr.cli import _expand_shortcut

    assert _expand_shortcut("--trainer.callbacks+=lightning_sr:memory") == f"--trainer.callbacks+={config_path('memory')}"
    assert _expand_shortcut("lightning_sr:predictions") == str(config_path("predictions"))
    assert _expand_shortcut("--data.path=prompts.jsonl") == "--data.path=prompts.jsonl"
    with pytest.raises(FileNotFoundError, match="choose one of \\['memory', 'online_merging', 'predictions'\\]"):
        _expand_shortcut("--trainer.callbacks+=lightning_sr:nope")


@pytest.mark.parametrize("name", ["SpeculativeRejectionModule", "PreferenceModule", "SFTModule"])
def test_public_names_of_our_modules_are_the_packages_lightning_modules(L, name):
    """``lightning_sr.<Name>``, ``lightning_sr.modules.<Name>``, the full path in the defining module
    and the explicit ``lightning_sr.<package>.<Name>`` are the package's LightningModule subclass;
    the class as written (the defining module's own global) is built for a package when
    instantiated (see lightning_packages)."""
    import importlib

    import lightning_sr
    import lightning_sr.modules
    from lightning_sr._lazy import LIGHTNING_CLASSES
    from lightning_sr.lightning_packages import written_class

    defining = importlib.import_module(LIGHTNING_CLASSES[name])
    written = vars(defining)[name]
    assert written is written_class(name)
    explicit = getattr(importlib.import_module(f"lightning_sr.{L.name}"), name)
    for public in (getattr(lightning_sr, name), getattr(lightning_sr.modules, name), getattr(defining, name), explicit):
        assert public is explicit and issubclass(public, L.LightningModule) and issubclass(public, written)
    assert not issubclass(written, L.LightningModule)  # built for a package when instantiated


def _real_base(L, name: str) -> type:
    """The base in ``L`` that our public Lightning class ``name`` is built on."""
    from lightning_sr._lazy import LIGHTNING_CLASSES

    module = LIGHTNING_CLASSES[name]
    if module.startswith("lightning_sr.modules."):
        return L.LightningModule
    if module.startswith("lightning_sr.data."):
        return L.LightningDataModule
    if module.startswith("lightning_sr.callbacks."):
        return L.Callback
    others = {"LightningSRCLI": L.sub("cli").LightningCLI, "FSDP2Strategy": L.sub("strategies").ModelParallelStrategy}
    return others[name]


def test_full_class_paths_are_the_packages_classes(L):
    """Every class of ours, looked up in its defining module as jsonargparse and ``issubclass``
    users do (``lightning_sr.callbacks.predictions.JSONLPredictionWriter``, ...), is the class built
    for the active package, a subclass of that package's base."""
    import importlib

    from lightning_sr._lazy import LIGHTNING_CLASSES
    from lightning_sr.data.prompts import PromptDataModule  # bound now: built for L
    from lightning_sr.lightning_packages import written_class

    assert issubclass(PromptDataModule, L.LightningDataModule)
    for name, module in LIGHTNING_CLASSES.items():
        full = getattr(importlib.import_module(module), name)
        assert full is getattr(importlib.import_module(f"lightning_sr.{L.name}"), name), name
        assert issubclass(full, _real_base(L, name)) and not issubclass(written_class(name), _real_base(L, name)), name
        assert full.__module__ == f"lightning_sr.{L.name}" and full.__qualname__ == name  # pickle's path, unchanged


def test_a_full_class_path_follows_the_active_package(monkeypatch):
    """In a process using both packages the same full path gives each package's class in turn, and
    the defining module's own code keeps the class written for both."""
    import importlib

    import lightning.pytorch
    import pytorch_lightning

    import lightning_sr.callbacks.predictions as predictions

    bases = {"lightning": lightning.pytorch.callbacks.BasePredictionWriter,
             "pytorch_lightning": pytorch_lightning.callbacks.BasePredictionWriter}
    for package, base in [*bases.items(), *bases.items()]:
        monkeypatch.setenv(PACKAGE_ENV, package)
        writer = predictions.JSONLPredictionWriter
        assert issubclass(writer, base) and writer.__module__ == f"lightning_sr.{package}"
        assert not any(issubclass(writer, other) for other in bases.values() if other is not base)
        for explicit, other in bases.items():  # an explicit name is built from the written class, not the attribute
            namespace = importlib.import_module(f"lightning_sr.{explicit}")
            vars(namespace).pop("JSONLPredictionWriter", None)  # first lookup while another package is active
            assert issubclass(namespace.JSONLPredictionWriter, other)
    assert vars(predictions)["JSONLPredictionWriter"]._lightning_package is None


def test_our_classes_and_their_instances_survive_pickling(L, tmp_path):
    """pickle checks ``getattr(module, qualname) is cls``: a written class of ours (its module's
    attribute is the built class) still pickles, and an instance comes back as the same package's."""
    import pickle

    from lightning_sr.lightning_packages import written_class

    written = written_class("JSONLPredictionWriter")
    assert pickle.loads(pickle.dumps(written)) is written
    built = getattr(__import__(f"lightning_sr.{L.name}", fromlist=["x"]), "JSONLPredictionWriter")
    assert pickle.loads(pickle.dumps(built)) is built
    for writer in (written(output_path=str(tmp_path / "a.jsonl")), built(output_path=str(tmp_path / "b.jsonl"))):
        copy = pickle.loads(pickle.dumps(writer))
        assert type(copy) is type(writer) and isinstance(copy, L.Callback) and copy.output_path == writer.output_path


def test_a_projects_cli_takes_full_class_paths_from_yaml(L, tmp_path):
    """A project's own LightningCLI, given our classes by their full paths in a config."""
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_sr.modules.preference.PreferenceModule", "init_args": {"policy": "x"}},
        "data": {"class_path": "lightning_sr.data.preferences.PreferenceDataModule",
                 "init_args": {"path": "x", "tokenizer": "x"}},
        "trainer": {"callbacks": [{"class_path": "lightning_sr.callbacks.memory.GPUMemoryProfiler"},
                                  {"class_path": "lightning_sr.callbacks.offline_merge.OfflineMerge",
                                   "init_args": {"base_model": "x", "output_dir": str(tmp_path / "merged")}}],
                    "logger": False, "accelerator": "cpu", "default_root_dir": str(tmp_path)},
    }))
    cli = L.sub("cli").LightningCLI(run=False, save_config_callback=None, args=[f"--config={config}"])
    assert isinstance(cli.model, L.LightningModule) and isinstance(cli.datamodule, L.LightningDataModule)
    names = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert isinstance(names["GPUMemoryProfiler"], L.Callback) and isinstance(names["OfflineMerge"], L.Callback)
    assert cli.config.model.class_path == "lightning_sr.modules.preference.PreferenceModule"


# ---------------------------------------------------------------- one package, import order

BLOCK = "import sys; sys.modules[{name!r}] = None  # as if {name} were not installed\n"


def python(code: str, block: str | None = None, env: dict | None = None) -> str:
    prelude = BLOCK.format(name=block) if block else ""
    environment = {k: v for k, v in __import__("os").environ.items() if k != PACKAGE_ENV}
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
        env={**environment, **(env or {})}, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.parametrize("blocked, expected", [("lightning", "pytorch_lightning"), ("pytorch_lightning", "lightning")])
def test_with_one_package_installed_everything_uses_it(blocked, expected):
    out = python(
        """
        import lightning_sr
        from lightning_sr.callbacks import GPUMemoryProfiler
        from lightning_sr.data import PromptDataModule
        from lightning_sr.lightning_packages import active_package
        module = lightning_sr.SpeculativeRejectionModule(n=2)
        print(active_package(), type(module).__module__, type(GPUMemoryProfiler()).__module__,
              type(PromptDataModule.__new__(PromptDataModule)).__module__)
        """,
        block=blocked,
    )
    assert out == " ".join([expected] + [f"lightning_sr.{expected}"] * 3)


def test_our_cli_runs_on_the_only_installed_package():
    out = python(
        """
        import sys
        from lightning_sr.cli import main
        sys.argv = ["lightning-sr", "fit", "--print_config", "--model=PreferenceModule", "--model.policy=x",
                    "--data=PreferenceDataModule", "--data.path=x", "--data.tokenizer=x"]
        try:
            main()
        except SystemExit:
            pass
        import lightning_sr
        print("lightning.pytorch" in sys.modules, lightning_sr.PreferenceModule.__module__)
        """,
        block="lightning",
    )
    assert out.splitlines()[-1] == "False lightning_sr.pytorch_lightning"


@pytest.mark.parametrize(
    "program, expected",
    [
        ("import pytorch_lightning as pl\nfrom lightning_sr import SpeculativeRejectionModule", "pytorch_lightning"),
        ("import lightning as L\nfrom lightning_sr import SpeculativeRejectionModule", "lightning"),
        # isort order: our import first, the Lightning package after it; the class is chosen when used
        ("from lightning_sr import SpeculativeRejectionModule\nimport pytorch_lightning as pl", "pytorch_lightning"),
        ("from lightning_sr import SpeculativeRejectionModule", "lightning"),  # nothing imported: lightning
    ],
)
def test_with_both_installed_our_classes_follow_the_programs_import(program, expected):
    out = python(program + "\nprint(type(SpeculativeRejectionModule(n=2)).__module__)")
    assert out == f"lightning_sr.{expected}"


def test_a_program_on_one_package_gets_that_packages_class_from_full_paths():
    """No environment variable, both packages installed: a ``pytorch_lightning`` program's
    ``issubclass`` checks on classes imported from our defining modules hold; one imported before
    the program's ``import pytorch_lightning`` is the written class, built when instantiated."""
    out = python(
        """
        from lightning_sr.callbacks.predictions import JSONLPredictionWriter as early
        import pytorch_lightning as pl
        from lightning_sr.modules.generation import SpeculativeRejectionModule
        from lightning_sr.data.prompts import PromptDataModule
        from lightning_sr.callbacks.predictions import JSONLPredictionWriter
        print(issubclass(SpeculativeRejectionModule, pl.LightningModule),
              issubclass(PromptDataModule, pl.LightningDataModule), issubclass(JSONLPredictionWriter, pl.Callback),
              issubclass(early, pl.Callback), type(early()).__module__)
        """
    )
    assert out == "True True True False lightning_sr.pytorch_lightning"  # imported before: built when used


def test_the_environment_variable_chooses_the_package():
    out = python(
        "import lightning\nfrom lightning_sr.callbacks import GPUMemoryProfiler\nprint(type(GPUMemoryProfiler()).__module__)",
        env={PACKAGE_ENV: "pytorch_lightning"},
    )
    assert out == "lightning_sr.pytorch_lightning"


def test_a_projects_own_module_and_callback_survive_pickling(L):
    """ddp_spawn pickles the module and callbacks: a class written on our stand-in bases outside
    lightning-sr comes back as the same package's class, with its state."""
    import pickle

    module, callback = _ProjectModule(), _ProjectCallback()
    module.layer.weight.data.fill_(0.5)
    copy, callback_copy = pickle.loads(pickle.dumps((module, callback)))
    assert type(copy) is type(module) and isinstance(copy, L.LightningModule)
    assert type(callback_copy) is type(callback) and callback_copy.seen == ["init"]
    assert torch.equal(copy.layer.weight, module.layer.weight)
    assert issubclass(_ProjectModule, LightningModule) and issubclass(_ProjectCallback, Callback)



class _ProjectModule(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


class _ProjectCallback(Callback):
    def __init__(self):
        self.seen = ["init"]
