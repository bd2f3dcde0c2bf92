"""Few-shot classification: a long prefix of labelled examples shared by every call.

The examples are the constant prefix of the template, so they are filled once into a pinned
global context; each review only adds its own tokens.
"""

import parrot_core as P


@P.semantic_function()
def classify(review: P.Input, label: P.Output(max_tokens=2, temperature=0.0)):
    """Classify the sentiment of each review as positive or negative.
    Review: The battery lasts all day and the screen is gorgeous. Sentiment: positive
    Review: It stopped working after a week and support never answered. Sentiment: negative
    Review: Setup took two minutes and it just works. Sentiment: positive
    Review: The fabric tore the first time I washed it. Sentiment: negative
    Review: Great value, I bought a second one for my sister. Sentiment: positive
    Review: The app crashes every time I open the settings page. Sentiment: negative
    Review: {{review}} Sentiment:{{label}}"""


REVIEWS = [
    "Fast delivery and the quality exceeded my expectations.",
    "The lid leaks and the coffee goes cold in an hour.",
    "My kids love it and use it every day.",
    "Broken on arrival, and the refund took a month.",
]


def main() -> None:
    with P.Runtime() as rt:
        labels = [classify(r) for r in REVIEWS]
        for review, label in zip(REVIEWS, labels):
            print(f"{label.get().strip():>9}  {review}")
        s = rt.stats()
        print(f"prompt tokens computed: {s['prompt_tokens_computed']}; the examples prefix was reused {s['context_cache_hits']} times")


if __name__ == "__main__":
    main()
