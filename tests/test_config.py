"""Recipes: YAML + overrides, type checks, closest-key errors, and every shipped recipe loads."""

from pathlib import Path

import pytest

from rlrf.config import ConfigError, load_recipe, parse_value

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_defaults_and_overrides():
    r = load_recipe(None, ["sample.n=3", "dpo.learning_rate=5e-5", "run=x", "evaluate.seeds=[1,2]"])
    assert r.sample.n == 3 and r.run == "x" and r.evaluate.seeds == [1, 2]
    assert isinstance(r.dpo.learning_rate, float) and r.dpo.learning_rate == 5e-5


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # plain PyYAML reads `5e-5` as the string "5e-5" (YAML 1.1); RecBole's pitfall
    p = tmp_path / "r.yaml"
    p.write_text("dpo:\n  learning_rate: 5e-5\n  beta: 1e-2\n")
    r = load_recipe(p)
    assert r.dpo.learning_rate == pytest.approx(5e-5) and r.dpo.beta == pytest.approx(0.01)
    assert parse_value("1e3") == 1000.0


def test_unknown_key_names_the_closest_known_key():
    with pytest.raises(ConfigError, match=r"unknown key 'sample.temprature'; did you mean sample.temperature\?"):
        load_recipe(None, ["sample.temprature=0.7"])
    with pytest.raises(ConfigError, match=r"did you mean reranker\?"):
        load_recipe(None, ["reranke.lr=0.1"])


def test_a_key_that_moved_names_its_new_home(tmp_path):
    with pytest.raises(ConfigError, match=r"rounds.learning_check_n is now check.n"):
        load_recipe(None, ["rounds.learning_check_n=4"])
    p = tmp_path / "old.yaml"
    p.write_text("rounds:\n  learning_check_users: 10\n")
    with pytest.raises(ConfigError, match=r"rounds.learning_check_users is now check.users.*old.yaml"):
        load_recipe(p)
    assert load_recipe(None, ["check.n=4", "check.users=10"]).check.n == 4


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("sample:\n  max_new_token: 10\n")
    with pytest.raises(ConfigError, match=r"max_new_tokens.*bad.yaml"):
        load_recipe(p)


@pytest.mark.parametrize("override,msg", [
    ("sample.n=many", "expected an integer"),
    ("sample.n=2.5", "expected an integer"),
    ("reranker.knowledge=maybe", "expected true/false"),
    ("dpo.beta=-1", "must be > 0"),
    ("sample.backend=tgi", "choose hf or vllm"),
    ("prepare.split=[0.5,0.5,0.5]", "summing to 1"),
    ("score.metric=recall@5", "ndcg@k or map@k"),
    ("run=../escape", "names a directory"),
    ("sample.n", "key.sub=value"),
    ("check.n=0", "check.n: must be >= 1"),
    ("check.users=0", "check.users: must be -1"),
    ("dpo.lora_layers=-1", "the number of top layers to adapt"),
])
def test_values_are_validated(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_recipe(None, [override])


def test_settings_the_llamafactory_backend_lacks_are_refused():
    with pytest.raises(ConfigError, match="dpo.lora_layers: LLaMA-Factory's LoRA adapts every layer"):
        load_recipe(None, ["dpo.backend=llamafactory", "dpo.lora_layers=15"])


def test_missing_recipe_file_says_where_recipes_are(tmp_path):
    with pytest.raises(ConfigError, match="recipes/"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.run and r.seed == 1234


def test_the_llamafactory_recipe_is_the_demo_but_for_its_dpo_backend():
    """The two are compared (README: time of a round with either backend), so nothing but the backend may differ."""
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    demo = load_recipe(recipes / "ml100k_smollm2.yaml").to_dict()
    lf = load_recipe(recipes / "llamafactory_dpo_smollm2.yaml").to_dict()
    assert (lf["dpo"]["backend"], lf["dpo"]["share_prompt"]) == ("llamafactory", False)
    assert lf["run"] != demo["run"]
    # share_prompt is the trl backend's packed forward, lora_layers its top-layer LoRA (which needs no checkpointing)
    assert (lf["dpo"]["lora_layers"], lf["dpo"]["gradient_checkpointing"]) == (0, True)
    # token_kl is computed in that packed forward too: LLaMA-Factory's DPO has no such term
    assert lf["dpo"]["token_kl"] == 0
    for key in ("backend", "share_prompt", "lora_layers", "gradient_checkpointing", "token_kl"):
        del lf["dpo"][key], demo["dpo"][key]
    del lf["run"], demo["run"]
    assert lf == demo


def test_section_hash_tracks_only_named_sections():
    a, b = load_recipe(None), load_recipe(None, ["dpo.beta=0.5"])
    assert a.section_hash("data", "prepare") == b.section_hash("data", "prepare")
    assert a.section_hash("dpo") != b.section_hash("dpo")


def test_rlrf_config_prints_the_resolved_recipe_and_every_key(capsys, repo):
    from rlrf.cli import main

    main(["config", "--recipe", str(repo / "recipes" / "tiny.yaml"), "sample.n=3", "--keys"])
    out = capsys.readouterr().out
    assert "run: tiny" in out and "  n: 3" in out
    assert "sample.temperature" in out and "nucleus sampling mass" in out


@pytest.mark.faults
def test_a_recipe_cannot_run_code(tmp_path):
    """Recipes load with a SafeLoader: a python tag is a clear error, and whatever it names never runs."""
    touched = tmp_path / "ran"
    p = tmp_path / "evil.yaml"
    p.write_text(f"run: !!python/object/apply:os.system ['touch {touched}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(ConfigError):
        load_recipe(None, [f"run=!!python/object/apply:os.system ['touch {touched}']"])
    assert not touched.exists()


def test_overrides_may_stand_anywhere_on_a_stage_command_line():
    from rlrf.cli import stage_args

    tiny = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml")
    recipe, args = stage_args("t", ["--recipe", tiny, "run=x", "--round", "2", "sample.n=3",
                                    "--force", "dpo.beta=0.5"], shards=True)
    assert (recipe.run, recipe.sample.n, recipe.dpo.beta, args.round, args.force) == ("x", 3, 0.5, 2, True)
    recipe, args = stage_args("t", ["run=y", "--recipe", tiny], rounds=False)
    assert recipe.run == "y"


def test_fingerprint_leaves_out_speed_and_place_keys_and_late_keys_at_their_default():
    """Stages finished before a `late` key existed stay up to date: the key enters their fingerprint only when set.
    Threads (speed) and reranker.retrain_each_round (place: where the judge lives, which the inputs carry) never do."""
    from rlrf.config import fingerprint

    r = load_recipe(None)
    assert "threads" not in fingerprint(r.sample) and "trim" not in fingerprint(r.sample)
    assert "retrain_each_round" not in fingerprint(r.reranker) and "threads" not in fingerprint(r.reranker)
    assert fingerprint(r.sample)["n"] == r.sample.n
    assert "contrast" not in fingerprint(r.score) and "trainer" not in fingerprint(r.rounds)
    on = load_recipe(None, ["score.reward=lexical", "score.contrast=5", "sample.trim=sentence", "rounds.trainer=grpo"])
    assert fingerprint(on.score)["contrast"] == 5 and fingerprint(on.sample)["trim"] == "sentence"
    assert fingerprint(on.rounds)["trainer"] == "grpo"


def test_each_key_with_fixed_values_is_dispatched_from_a_table_of_exactly_those_values():
    """A value is typed once (config's Literal) and its dispatch table holds exactly those values: a new backbone,
    reward or backend is one entry in the table plus its name in the Literal."""
    from typing import get_args

    from rlrf import backbones, config, dpo, generate, reward

    tables = {config.Backbone: [backbones.BACKBONES], config.SampleBackend: [generate.BACKENDS],
              config.DPOBackend: [dpo.BACKENDS], config.Reward: [reward.REWARDS]}
    for literal, dicts in tables.items():
        for table in dicts:
            assert set(table) == set(get_args(literal))
    # grpo.reward: every training-free judge ("" = score.reward's)
    assert set(get_args(config.TextReward)) == {""} | {k for k in reward.REWARDS if k != "reranker"}
    # pairs.agree_with: the same judges, derived from Reward, so a new reward is named once
    from rlrf.config.keys import TextJudge

    assert set(get_args(TextJudge)) == {k for k in reward.REWARDS if k != "reranker"}


@pytest.mark.parametrize("override,msg", [
    ("reranker.backbone=gru", r"reranker.backbone: unknown value 'gru'; choose dlcm or prm"),
    ("evaluate.backbones=[dlcm,gru]", r"evaluate.backbones: unknown value 'gru'; each must be dlcm or prm"),
    ("sample.dtype=fp16", r"sample.dtype: unknown value 'fp16'; choose auto, bfloat16 or float32"),
    ("score.reward=bm25", r"score.reward: unknown value 'bm25'; choose reranker, retrieval, lexical or genres"),
    ("grpo.reward=reranker", r"grpo.reward: .*cross-fitted on the sample stage's users"),
    ("rounds.trainer=ppo", r"rounds.trainer: unknown value 'ppo'; choose dpo or grpo"),
    ("dpo.backend=true", r"dpo.backend: expected a string, got True"),
])
def test_a_value_outside_its_choices_names_the_key_and_the_choices(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_recipe(None, [override])


def test_a_section_built_in_code_is_checked_like_a_recipe():
    from rlrf.config import RerankerConfig

    with pytest.raises(ConfigError, match="reranker.backbone: unknown value 'gru'"):
        RerankerConfig(backbone="gru")


def test_speed_keys_are_in_no_fingerprint():
    """Keys marked speed=True (threads) change how fast a stage runs, not what it writes: every stage's sections
    are the same with any value of them, so a rerun with other threads resumes."""
    a, b = load_recipe(None), load_recipe(None, ["sample.threads=1", "reranker.threads=2"])
    names = a.section_names()
    assert {"sample", "reranker", "dpo", "grpo"} <= set(names)
    assert a.sections(*names) == b.sections(*names)
    assert a.section_hash("sample", "reranker") == b.section_hash("sample", "reranker")
    assert a.sections("sample") != load_recipe(None, ["sample.n=8"]).sections("sample")
