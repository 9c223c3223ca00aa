"""Change control: a plan declared before a challenger exists (what may change, how it is judged, the criteria), and
the comparison of a challenger with the champion on reviewed cases the challenger never trained on."""
