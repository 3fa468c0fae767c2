"""Start page: what a newcomer does first. Without trained runs, one button queues the five demo runs (the
Train page's "Train all five" with the Quick demo defaults on the synthetic set); while they train, their
progress; once runs exist, where to go next."""

from __future__ import annotations

import streamlit as st

from core.config import DataSpec
from core.training.jobs import batch_jobs, describe_batch
from pages.common import (
    ALL_FIVE,
    SEEN_DEMO,
    can_administer,
    demo_config,
    queue_all_five,
    require_entrypoint,
    rerun_page_on_change,
    run_store,
    runs_with_models,
    shared_job_queue,
)

NEXT_STEPS = [
    ("pages/compare.py", "Compare", ":material/compare_arrows:", "the five models' metrics, with intervals and tests"),
    ("pages/explain.py", "Explain", ":material/visibility:", "where each model looks on a test image (CAMs)"),
    ("pages/audit.py", "Audit", ":material/fact_check:", "whether those maps can be trusted"),
    ("pages/data.py", "Data", ":material/photo_library:", "the images the models learnt from"),
]


def demo_button() -> None:
    st.markdown("There are no trained models on this server yet. The quickest way in is the **demo**: the five "
                "models (ResNet18, ResNet50, DenseNet121, EfficientNetB0 and the Hybrid S-ResNet) trained on the "
                "built-in synthetic set with the *Quick demo* settings, one after another in the background. It "
                "takes a few minutes on a laptop's CPU; you can look around meanwhile.")
    if st.button("Prepare the demo runs", key="start.demo", type="primary", icon=":material/rocket_launch:"):
        if queue_all_five(DataSpec(), demo_config):
            st.toast("Queued the five demo runs.", icon=":material/schedule:")
            st.rerun()
    st.caption("Or choose your own data on the Data page and your settings on the Train page.")


@st.fragment(run_every=2.0)
def demo_progress() -> None:
    """The demo's progress line; the whole page is redrawn when a demo run ends or the batch starts or
    ends (the next steps, or the teacher's demo, appear without a reload)."""
    snapshot = shared_job_queue().snapshot()
    progress = describe_batch(snapshot, ALL_FIVE)
    if progress:
        st.info(f"The demo runs are training: {progress}. Compare and Explain fill in as they finish.",
                icon=":material/hourglass_top:")
    jobs = batch_jobs(snapshot, ALL_FIVE)
    seen = (progress is not None, sum(not job.active for job in jobs))
    rerun_page_on_change(SEEN_DEMO, seen)


def next_steps(count: int) -> None:
    st.success(f"{count} trained run(s) are ready.", icon=":material/check_circle:")
    for path, label, icon, what in NEXT_STEPS:
        st.page_link(path, label=f"{label}: {what}", icon=icon)


def main() -> None:
    require_entrypoint()
    st.title("Start")
    st.caption("An explainability dashboard for skin-lesion classification: five CNNs tell benign from malignant, "
               "and class activation maps (Grad-CAM and kin) show where each one looks.")
    trained = runs_with_models(run_store())
    training = describe_batch(shared_job_queue().snapshot(), ALL_FIVE) is not None
    if trained:
        next_steps(len(trained))
    elif training:
        pass  # the progress line below says what is happening
    elif can_administer():
        demo_button()
    else:
        st.info("The teacher has not trained the models yet: wait for the teacher; this page follows along.",
                icon=":material/hourglass_empty:")
    demo_progress()


main()
