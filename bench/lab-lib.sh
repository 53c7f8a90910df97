# Shared by the lab halves of the benchmarks (prepended to their scripts).

# print_ratios SAMPLES: SAMPLES has lines "vmm job value" (vmm: cloister or qemu); prints, for
# every job in order, both medians and their ratio, and marks ratio.JOB for the harness.
print_ratios() {
    awk '
        { n[$1, $2]++; v[$1, $2, n[$1, $2]] = $3; if (!($2 in seen)) { seen[$2] = 1; order[++jobs] = $2 } }
        function median(vmm, job,   k, i, j, t, a) {
            k = n[vmm, job]
            for (i = 1; i <= k; i++) a[i] = v[vmm, job, i] + 0
            for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return k == 0 ? 0 : (k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2)
        }
        END {
            for (i = 1; i <= jobs; i++) {
                c = median("cloister", order[i]); q = median("qemu", order[i])
                r = (q > 0) ? sprintf("%.2f", c / q) : "na"
                printf "   %-22s cloister %10.1f   qemu %10.1f   cloister/qemu %s\n", order[i], c, q, r
                printf "@@CLOISTER-MARK ratio.%s=%s@@\n", order[i], r
            }
        }' "$1"
}
