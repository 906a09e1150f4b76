"""What a run or a registered model is, in a sentence or a small table of its own numbers: the
Markdown the MLflow UI shows on a run's page, a registered version's and a registered model's.
Every number comes from the run that made it; nothing here measures or decides.
"""
from __future__ import annotations

FLOAT_RECIPES = ("ort-f32", "openvino-f32", "openvino-bf16")  # candidates that deploy the float graph


def points(x: float) -> str:
    return f"{100 * x:.1f}%"


def metric_name(metric: str) -> str:
    return metric.replace("_", "-")


def trained_version(step: str, params: dict, metrics: dict, dataset: str, selection_metric: str) -> str:
    """A teacher's or student's version: what was trained on what, how, and its validation and test metric."""
    what = "Teacher" if step == "teacher" else f"Student `{params.get('student', '?')}`"
    source = params.get("student_init") or params.get("model", "?")  # what its weights started from
    alpha = float(params.get("alpha", 0) or 0)
    how = ""
    if step != "teacher":
        how = (f", distilled from `{params.get('teacher')}` (alpha {alpha:g}, temperature {params.get('temperature')})"
               if alpha > 0 else ", without the teacher (alpha=0: the labels alone)")
    m = metric_name(selection_metric)
    return (f"{what} for {dataset}: `{source}` fine-tuned on {params.get('n_train', '?')} texts "
            f"for {params.get('epochs', '?')} epoch(s) at lr {params.get('lr', '?')}, seed {params.get('seed', '?')}"
            f"{how}. Validation {m} {points(metrics[f'val_{selection_metric}'])}, test {m} "
            f"{points(metrics[f'test_{selection_metric}'])} on {params.get('n_test', '?')} texts.")


def quantized_version(parent, recipe: str, runtime: str, graph: str, numbers: dict, metrics: dict,
                      n_judged: int, dataset: str, hardware: dict) -> str:
    """A deployed graph's version: its parent, recipe, runtime and what its graph computes in, what it
    keeps of the parent on the judged texts and the gate's verdict, its speed against the parent's
    ONNX Runtime fp32 graph, the CPU it was validated on."""
    kind = ("INT8 graph" if graph == "int8" else
            f"{graph} graph (float: {'no INT8 recipe was chosen' if numbers else 'a fixed recipe'})")
    speed = (f" It ran {numbers['speed']:.2f}x the speed of the parent's ONNX Runtime fp32 graph (geometric mean "
             "of one real text and batches of 1 and 32)." if "speed" in numbers else "")
    features = ", ".join(k.removeprefix("validated_on.") for k, v in sorted(hardware.items())
                         if v == "True" and k.removeprefix("validated_on.") not in ("onnxruntime", "openvino"))
    return (f"Deployable {kind} of `{parent.name}` v{parent.version} for {dataset}: recipe `{recipe}`, run by "
            f"{runtime} ({int(metrics['int8_integer_nodes'])} integer nodes). On {n_judged} held-out texts"
            f"{' its choice did not see (chosen on %d others)' % numbers['choice_texts'] if 'choice_texts' in numbers else ''}"
            f" it agrees with the fp32 parent on "
            f"{points(metrics['int8_judge_agreement_with_fp32'])} (at least "
            f"{100 * metrics['int8_judge_agreement_with_fp32_low']:.2f}% by its one-sided 95% bound); accuracy "
            f"{100 * (metrics['onnx_int8_judge_accuracy'] - metrics['torch_fp32_judge_accuracy']):+.2f} (at least "
            f"{metrics['gate_accuracy_change_low_points']:+.2f}) and macro-recall "
            f"{100 * (metrics['onnx_int8_judge_macro_recall'] - metrics['torch_fp32_judge_macro_recall']):+.2f} (at "
            f"least {metrics['gate_macro_recall_change_low_points']:+.2f}) points, served ECE "
            f"{metrics['gate_ece_change']:+.4f}: gate {'passed' if metrics['gate_passed'] else 'failed'}."
            f"{speed} Validated on {hardware.get('validated_on.cpu', '?')} ({features or 'no AVX-512'}), "
            f"{hardware.get('validated_on.threads', '?')} threads.")


def registered_model(name: str, step: str, dataset: str, parent_name: str = "") -> str:
    """What the versions of a registered model are for."""
    if step == "quantize":
        return (f"Deployable graphs of `{parent_name}` for {dataset} (INT8 where the accuracy budget allows), made "
                "by `kd-sentiment quantize`. `@candidate` is the newest; `@champion` the promoted one, to serve with "
                f"`mlflow models serve -m models:/{name}@champion`. Each version's description says what it is.")
    if name.endswith(("-nokd", "-kd-no-transfer")):
        return (f"Baseline twins of the {dataset} students, trained by `kd-sentiment distill` "
                f"({'alpha=0: the labels alone' if name.endswith('-nokd') else 'KD without the transfer set'}), "
                "registered without an alias: what the KD student is compared with. Each version's description "
                "says what it is.")
    who = "Teachers" if step == "teacher" else "Students"
    return (f"{who} for {dataset}, trained by `kd-sentiment {step}`. `@champion` marks the one the next step "
            f"uses ({'students are distilled from it' if step == 'teacher' else 'it is quantized and deployed'}). "
            "Each version's description says what it is.")
