"""The best artifact under a size: per-tensor schemes chosen from measured sensitivity.

    convert --max-size 105MB | --bpw 4.5
      sensitivity.py   sample text from the fp32 model; mean x^2 per input channel of every linear;
                       KL divergence with one unit quantized at a time            -> Sensitivity
      choose.py        ladders per unit, bytes from the lazily built graph, greedy by KL saved per
                       byte under the budget                                     -> FitChoice (recipe,
                       importance-searched codes, report for the manifest)

``quantlab.api.convert`` runs these as its *choose* stage; the artifact is then written as usual and
its real size checked before it is renamed into place.
"""
