/* Calls usm_hint() from libusm.so (header usm.h). Prints the return codes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "usm.h"

int main(void) {
    size_t len = 1 << 20;
    char *buf = malloc(len);
    memset(buf, 1, len);
    int hint = usm_hint(buf, len, "cold:sequential");
    int null = usm_hint(buf, len, NULL);
    int empty = usm_hint(buf, 0, "cold");
    printf("hint=%d null=%d empty=%d %s\n", hint, null, empty, (null == -22 && empty == -22) ? "OK" : "BAD");
    free(buf);
    return 0;
}
