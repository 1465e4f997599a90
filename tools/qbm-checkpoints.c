/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qbm-checkpoints: `qbm checkpoints` as a program of its own, the one that
 * links libxml2 (qbm runs it; see cmd_checkpoints_exec in qbm.c).
 */
#include "qbm-tool.h"

int main(int argc, char **argv)
{
    return cmd_checkpoints(argc, argv);
}
