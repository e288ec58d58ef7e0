"""Model soups (Wortsman et al., 2022), the baselines of TWA's soup mode: averages of models of one
architecture, e.g. fine-tuned from one start with different hyperparameters.

The uniform soup averages all of them; the greedy soup goes through them from the best held-out
accuracy down and keeps each one whose addition does not lower the soup's held-out accuracy.
"""
import twa


def average_state_dicts(sources):
    """The entrywise mean of state_dicts (files or mappings), accumulated in float64 one at a time;
    integer entries (BatchNorm's batch counters) are taken from the first."""
    total, first = None, None
    for source in sources:
        state = twa.checkpoints.load_state_dict(source)
        if total is None:
            first = state
            total = {k: v.double() for k, v in state.items() if v.is_floating_point()}
            continue
        for key in total:
            total[key] += state[key].double()
    return {k: (total[k] / len(sources)).to(v.dtype) if k in total else v.clone()
            for k, v in first.items()}


def greedy_soup(ranked, score):
    """The members of the greedy soup: `ranked` models best first, score(members) the held-out
    accuracy of the soup of those members. Returns (members, their score)."""
    members = [ranked[0]]
    best = score(members)
    for candidate in ranked[1:]:
        trial = score(members + [candidate])
        if trial >= best:  # ties keep the ingredient, as in the paper
            members, best = members + [candidate], trial
    return members, best
