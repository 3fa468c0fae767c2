"""The Quiz page in a real browser: clicks and a dragged box on the image inside the
streamlit-image-coordinates component's iframe become marks, the answer reveals the five models' maps and
the scores, and the teacher's class summary counts the answers. Screenshots go to test-artifacts/."""

import re

from browser_support import ARTIFACTS, BROWSER_TEST, go_to, no_exceptions

pytestmark = BROWSER_TEST

COMPONENT = "iframe[title*='streamlit_image_coordinates']"


def quiz_image(page):
    """The image inside the component's iframe, once the rerun is over (a stale frame of the previous run is
    gone) and the frame has been sized to the image."""
    page.wait_for_function("""() => {
        const frames = document.querySelectorAll("iframe[title*='streamlit_image_coordinates']");
        return frames.length === 1 && frames[0].getBoundingClientRect().height > 100; }""", timeout=60_000)
    image = page.frame_locator(COMPONENT).locator("img#image")
    image.wait_for(timeout=60_000)
    return image


def image_box(page) -> dict:
    """The image's place on the page (the iframe's box: the component sizes its frame to the image)."""
    return page.locator(COMPONENT).bounding_box()


def answer_and_reveal(page, answer: str) -> None:
    page.get_by_role("radiogroup", name="Your answer").get_by_text(answer, exact=True).click()
    page.wait_for_timeout(800)
    page.get_by_role("button", name="Answer and reveal").click()
    page.get_by_text(re.compile(r"^It is (benign|malignant)\.")).wait_for(timeout=120_000)
    page.wait_for_timeout(1500)


def test_a_student_marks_answers_and_sees_the_reveal(five_runs, dashboard, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dashboard)
    page.get_by_role("heading", name="Data", level=1).wait_for(timeout=60_000)
    go_to(page, "Quiz")
    page.get_by_role("heading", name="Image 1").wait_for(timeout=120_000)
    quiz_image(page).click(position={"x": 160, "y": 160})
    page.get_by_text("1 point marked").wait_for(timeout=30_000)
    quiz_image(page).click(position={"x": 60, "y": 250})
    page.get_by_text("2 points marked").wait_for(timeout=30_000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "quiz-marked.png"), full_page=True)

    answer_and_reveal(page, "malignant")
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "quiz-reveal.png"), full_page=True)
    for name in ("You", "ResNet18", "ResNet50", "DenseNet121", "EfficientNetB0", "Hybrid S-ResNet"):
        assert page.locator("[data-testid='stMarkdownContainer'] strong", has_text=re.compile(f"^{name}$")).count()
    assert page.get_by_text("of 5 models were right").count() == 1
    answers = page.locator("[data-testid='stMetric']").filter(has_text="Answers").first
    assert answers.inner_text().split()[-1] == "1"

    page.get_by_role("button", name="Next image").click()
    page.get_by_role("heading", name="Image 2").wait_for(timeout=60_000)
    page.get_by_text("Draw a box", exact=True).click()
    page.wait_for_timeout(1500)
    quiz_image(page)
    box = image_box(page)
    page.mouse.move(box["x"] + 80, box["y"] + 80)
    page.mouse.down()
    page.mouse.move(box["x"] + 200, box["y"] + 220, steps=8)
    page.mouse.up()
    page.get_by_text("A box marked.").wait_for(timeout=30_000)
    answer_and_reveal(page, "benign")
    no_exceptions(page)
    assert page.locator("[data-testid='stMetric']").filter(has_text="Answers").first.inner_text().split()[-1] == "2"
    page.screenshot(path=str(ARTIFACTS / "quiz-reveal-box.png"), full_page=True)

    page.get_by_role("tab", name="Class summary (teacher)").click()
    page.get_by_text("Where the students looked").wait_for(timeout=60_000)
    page.wait_for_timeout(2000)
    no_exceptions(page)
    page.screenshot(path=str(ARTIFACTS / "quiz-class.png"), full_page=True)
