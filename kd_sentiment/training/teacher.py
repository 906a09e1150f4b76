"""The `teacher` step: fine-tune a large pretrained model on the dataset and register it.

The registered version (`kd-sentiment-teacher-<dataset>`, alias `champion` by default) is what the
distill step pulls its soft targets from. Its tag `init_source` names the pre-trained model it was
fine-tuned from: students cut from the teacher (`teacher-layers:...`) start from that.
"""
from __future__ import annotations

from kd_sentiment.core import tracking
from kd_sentiment.core.models import load_catalog, load_classifier, resolve, with_layers
from kd_sentiment.core.parameters import TeacherArgs
from kd_sentiment.training.steps import slug, fit_and_evaluate, log_step_params, publish, set_up


def registered_name(dataset: str) -> str:
    return tracking.registered_name("teacher", dataset)


def run(args: TeacherArgs) -> dict:
    """Fine-tune, evaluate, log and register the teacher; returns its final metrics."""
    catalog = load_catalog(args.catalog)
    model_name = args.model or catalog["teacher"]
    ctx = set_up("teacher", args, model_name, catalog)
    source, layers = resolve(model_name, ctx.catalog)
    with tracking.step_run("teacher", f"teacher-{slug(model_name)}", run_id=ctx.run_id, active=ctx.is_main):
        model, tokenizer = load_classifier(source, ctx.splits.label_names, layers)
        if ctx.is_main:
            log_step_params(ctx, args, model=model_name, model_source=source)
        result, metrics, _ = fit_and_evaluate(ctx, args, model, tokenizer)
        if ctx.is_main:
            publish(result.model, tokenizer, ctx.splits, args.name or registered_name(ctx.splits.name), args.alias,
                    {"step": "teacher", "model_source": source, "init_source": with_layers(source, layers)},
                    args.train.max_length, metrics)
        ctx.accelerator.wait_for_everyone()
    return metrics

