"""The counts `nft status` shows: a campaign's structures by kind, jobs by status, reference atoms,
reused results, iterations and models."""

from __future__ import annotations

from sqlalchemy import func, select

from pipeline.storage.records import StoreSummary
from pipeline.storage.schema import (
    JOB_STATUSES,
    STRUCTURE_KINDS,
    CampaignJobRow,
    IterationRow,
    ModelRow,
    ReferenceJobRow,
    StructureRow,
)
from pipeline.storage.session import StoreSession

__all__ = ["SummaryStore"]


class SummaryStore(StoreSession):
    """The summary part of `CampaignStore`."""

    def summary(self) -> StoreSummary:
        """Counts over the campaign's own structures, jobs, iterations and models (the whole database
        for a store opened on it alone); `reference_atoms` sums the atoms of done reference jobs,
        `reused` counts done jobs another campaign computed."""
        campaign = self._campaign_id
        with self._read() as session:
            jobs = dict.fromkeys(JOB_STATUSES, 0)
            job_statuses = self._own_jobs(select(ReferenceJobRow.status, func.count()), ordered=False)
            for status, count in session.execute(job_statuses.group_by(ReferenceJobRow.status)):
                jobs[status] = int(count)
            kinds = dict.fromkeys(STRUCTURE_KINDS, 0)
            structure_kinds = self._own_structures(select(StructureRow.kind, func.count()), ordered=False)
            for kind, count in session.execute(structure_kinds.group_by(StructureRow.kind)):
                kinds[kind] = int(count)
            reference_atoms = session.scalar(
                self._own_jobs(
                    select(func.coalesce(func.sum(StructureRow.n_atoms), 0)).join(
                        ReferenceJobRow, ReferenceJobRow.structure_id == StructureRow.id
                    ),
                    ordered=False,
                ).where(ReferenceJobRow.status == "done")
            )
            reused = 0
            if campaign is not None:
                reused = session.scalar(
                    self._own_jobs(select(func.count()).select_from(ReferenceJobRow), ordered=False).where(
                        ReferenceJobRow.status == "done", CampaignJobRow.reused.is_(True)
                    )
                )
            iterations = select(func.count()).select_from(IterationRow)
            models = select(func.count()).select_from(ModelRow)
            if campaign is not None:
                iterations = iterations.where(IterationRow.campaign_id == campaign)
                models = models.where(ModelRow.campaign_id == campaign)
            iteration_count = session.scalar(iterations)
            model_count = session.scalar(models)
        return StoreSummary(
            jobs=jobs,
            targets=kinds["target"],
            initial=kinds["initial"],
            chunks=kinds["chunk"],
            reference_atoms=int(reference_atoms or 0),
            iterations=int(iteration_count or 0),
            models=int(model_count or 0),
            reused=int(reused or 0),
        )
